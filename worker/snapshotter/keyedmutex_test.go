package snapshotter

import (
	"context"
	"errors"
	"testing"
)

func TestKeyedMutex(t *testing.T) {
	var k keyedMutex
	ctx := context.Background()

	unlockA, err := k.lock(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	// Another key is independent.
	unlockB, err := k.lock(ctx, "b")
	if err != nil {
		t.Fatalf("lock b while a is held: %v", err)
	}
	unlockB()

	// The same key waits, and gives up with the context.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := k.lock(cctx, "a"); !errors.Is(err, context.Canceled) {
		t.Fatalf("lock of a held key with a cancelled context = %v, want context.Canceled", err)
	}

	acquired := make(chan func())
	go func() {
		unlock, err := k.lock(ctx, "a")
		if err != nil {
			t.Error(err)
		}
		acquired <- unlock
	}()
	unlockA()
	(<-acquired)()

	if len(k.locks) != 0 {
		t.Errorf("%d locks left after all were released", len(k.locks))
	}
}
