package store

import (
	"context"
	"testing"
	"time"
)

// TestDemandHandler: a blocked read names the missing chunks it covers and,
// if it continues what arrived, the missing ones after it, stopping at the
// first chunk already in.
func TestDemandHandler(t *testing.T) {
	s := openStore(t)
	c := newContent(t, 21, 4*1024, 1024)
	if err := s.Expect(c.d, int64(len(c.data)), c.chunks); err != nil {
		t.Fatal(err)
	}
	demands := make(chan Demand, 10)
	s.SetDemandHandler(func(d Demand) { demands <- d })
	offsets := func(d Demand) []int64 {
		var out []int64
		for _, ch := range d.Chunks {
			out = append(out, ch.Offset)
		}
		return out
	}
	read := func(off int64) {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		if _, err := s.ReadAt(ctx, c.d, make([]byte, 10), off); err != context.DeadlineExceeded {
			t.Fatalf("read at %d: %v, want it blocked", off, err)
		}
	}

	if err := c.write(t, s, 0); err != nil {
		t.Fatal(err)
	}
	read(1024 + 5) // continues chunk 0: sequential
	if got := offsets(<-demands); len(got) != 3 || got[0] != 1024 || got[2] != 3072 {
		t.Fatalf("demanded %v, want chunks at 1024, 2048, 3072", got)
	}
	if err := c.write(t, s, 2); err != nil {
		t.Fatal(err)
	}
	read(1024 + 5)
	if got := offsets(<-demands); len(got) != 1 || got[0] != 1024 {
		t.Fatalf("demanded %v, want only the chunk at 1024", got)
	}
	if len(demands) != 0 {
		t.Fatalf("%d extra demands", len(demands))
	}
	// A read that does not continue what arrived asks for its own
	// chunk only.
	d := newContent(t, 22, 4*1024, 1024)
	if err := s.Expect(d.d, int64(len(d.data)), d.chunks); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	s.ReadAt(ctx, d.d, make([]byte, 10), 2048)
	if got := offsets(<-demands); len(got) != 1 || got[0] != 2048 {
		t.Fatalf("demanded %v for a read in the middle, want only the chunk at 2048", got)
	}
	// A read of arrived data demands nothing.
	if _, err := s.ReadAt(context.Background(), c.d, make([]byte, 10), 2048); err != nil {
		t.Fatal(err)
	}
	if len(demands) != 0 {
		t.Fatal("a read of an arrived chunk made a demand")
	}
}
