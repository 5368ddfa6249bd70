package snapshotter

import (
	"context"
	"sync"
)

// keyedMutex is a set of mutexes indexed by key, created on demand and
// dropped when nobody holds or waits for them. Waiting honours cancellation.
// The zero value is ready to use.
type keyedMutex struct {
	mu    sync.Mutex
	locks map[string]*keyedLock
}

type keyedLock struct {
	ch   chan struct{} // holds a token while locked
	refs int           // holders and waiters
}

// lock locks key and returns the function that unlocks it.
func (k *keyedMutex) lock(ctx context.Context, key string) (func(), error) {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = make(map[string]*keyedLock)
	}
	l, ok := k.locks[key]
	if !ok {
		l = &keyedLock{ch: make(chan struct{}, 1)}
		k.locks[key] = l
	}
	l.refs++
	k.mu.Unlock()

	select {
	case l.ch <- struct{}{}:
		return func() {
			<-l.ch
			k.put(key, l)
		}, nil
	case <-ctx.Done():
		k.put(key, l)
		return nil, ctx.Err()
	}
}

func (k *keyedMutex) put(key string, l *keyedLock) {
	k.mu.Lock()
	l.refs--
	if l.refs == 0 {
		delete(k.locks, key)
	}
	k.mu.Unlock()
}
