package delta

import (
	"container/list"
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// planCache shares prepared plans between requests. Concurrent requests
// for the same plan wait for one computation; a computed plan is kept for
// a while (planTTL), least recently used first out, within a bound on the
// bytes of its spool files and on their number (each is an open file).
// At most slots plans are computed at once, whatever the number of
// requests: a plan holds its image's trees in memory while it runs.
//
// A prepared plan is reference-counted: the cache holds one reference
// while it keeps the plan, every stream one while it reads it; the spool
// file is closed with the last reference. A plan evicted while streams
// read it stays on disk (unlinked) until they end.
type planCache struct {
	maxBytes   int64
	maxEntries int
	ttl        time.Duration
	slots      chan struct{}

	mu      sync.Mutex
	byKey   map[string]*list.Element // of *prepared
	lru     list.List                // front: most recently used
	bytes   int64
	flights map[string]*flight

	computed, reused atomic.Int64
}

// flight is a plan being computed for the requests waiting on it.
type flight struct {
	done    chan struct{}
	cancel  context.CancelFunc
	waiters int // guarded by planCache.mu
	pr      *prepared
	err     error
}

func newPlanCache(l Limits) *planCache {
	c := &planCache{
		maxBytes:   l.CacheSize,
		maxEntries: planCacheEntries,
		ttl:        planTTL,
		slots:      make(chan struct{}, l.Plans),
		byKey:      map[string]*list.Element{},
		flights:    map[string]*flight{},
	}
	if c.maxBytes <= 0 {
		c.maxEntries = 0
	}
	return c
}

// get returns the plan of key with a reference the caller releases:
// a kept one, the one being computed, or a new one from compute. A caller
// that gives up (ctx) does not stop a computation others wait for; the
// last one to give up does.
func (c *planCache) get(ctx context.Context, key string, compute func(context.Context) (*prepared, error)) (*prepared, error) {
	c.mu.Lock()
	if e, ok := c.byKey[key]; ok {
		pr := e.Value.(*prepared)
		if time.Now().UnixNano() < pr.expires {
			pr.refs++
			c.lru.MoveToFront(e)
			c.mu.Unlock()
			c.reused.Add(1)
			return pr, nil
		}
		c.removeLocked(e)
	}
	fl := c.flights[key]
	if fl == nil {
		// The computation belongs to no request: it keeps the values of
		// ctx (logger, trace) but not its cancellation.
		fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		fl = &flight{done: make(chan struct{}), cancel: cancel}
		c.flights[key] = fl
		go c.run(fctx, key, fl, compute)
	} else {
		c.reused.Add(1)
	}
	fl.waiters++
	c.mu.Unlock()

	select {
	case <-fl.done:
		return fl.pr, fl.err // run gave this waiter a reference
	case <-ctx.Done():
	}
	c.mu.Lock()
	select {
	case <-fl.done:
		c.mu.Unlock()
		if fl.pr != nil {
			c.release(fl.pr)
		}
	default:
		fl.waiters--
		if fl.waiters == 0 {
			// Nobody wants this plan any more: stop it, and let the next
			// request start afresh.
			fl.cancel()
			if c.flights[key] == fl {
				delete(c.flights, key)
			}
		}
		c.mu.Unlock()
	}
	return nil, ctx.Err()
}

func (c *planCache) run(ctx context.Context, key string, fl *flight, compute func(context.Context) (*prepared, error)) {
	defer fl.cancel()
	var pr *prepared
	var err error
	select {
	case c.slots <- struct{}{}:
		c.computed.Add(1)
		pr, err = compute(ctx)
		<-c.slots
	case <-ctx.Done():
		err = ctx.Err()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.flights[key] == fl {
		delete(c.flights, key)
	}
	if err == nil {
		pr.refs = fl.waiters
		pr.expires = time.Now().Add(c.ttl).UnixNano()
		c.insertLocked(pr)
		if pr.refs == 0 {
			pr.file.Close()
		}
	}
	fl.pr, fl.err = pr, err
	close(fl.done)
}

// insertLocked keeps pr if it fits, evicting the least recently used.
func (c *planCache) insertLocked(pr *prepared) {
	if c.maxEntries == 0 || pr.size > c.maxBytes {
		return
	}
	if e, ok := c.byKey[pr.key]; ok {
		c.removeLocked(e)
	}
	pr.cached = true
	pr.refs++
	c.byKey[pr.key] = c.lru.PushFront(pr)
	c.bytes += pr.size
	for c.bytes > c.maxBytes || c.lru.Len() > c.maxEntries {
		c.removeLocked(c.lru.Back())
	}
}

// removeLocked drops the cache's reference to a kept plan.
func (c *planCache) removeLocked(e *list.Element) {
	pr := c.lru.Remove(e).(*prepared)
	delete(c.byKey, pr.key)
	c.bytes -= pr.size
	pr.cached = false
	c.unrefLocked(pr)
}

// release drops a reference get returned.
func (c *planCache) release(pr *prepared) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.unrefLocked(pr)
}

func (c *planCache) unrefLocked(pr *prepared) {
	pr.refs--
	if pr.refs == 0 {
		pr.file.Close()
	}
}

// close drops every kept plan; plans being streamed close when their
// streams end.
func (c *planCache) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.lru.Len() > 0 {
		c.removeLocked(c.lru.Back())
	}
}
