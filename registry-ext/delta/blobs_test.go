package delta

import (
	"bytes"
	"context"
	"io"
	"testing"

	"github.com/opencontainers/go-digest"
)

// TestBlobCache reads ranges of more blobs than the cache keeps open, in
// an order that seeks forward, backward, skips within the read-ahead and
// evicts.
func TestBlobCache(t *testing.T) {
	f := newFixture(t)
	var (
		blobs [][]byte
		dgsts []digest.Digest
	)
	for i := range openBlobs + 2 {
		b := data(uint64(100+i), 5*readAhead)
		blobs = append(blobs, b)
		dgsts = append(dgsts, f.blobs.put(t, b))
	}
	type read struct {
		blob      int
		off, size int64
	}
	var reads []read
	for round := range 3 {
		for i := range blobs {
			off := int64(round) * readAhead
			reads = append(reads,
				read{i, off, 1000},            // from a new blob or after a seek
				read{i, off + 1000, 5000},     // contiguous
				read{i, off + 10000, 10},      // skip within the read-ahead
				read{i, off + 2*readAhead, 7}, // beyond it: seek
				read{i, off + 10, 20},         // backward: seek
			)
		}
	}
	c := newBlobCache(f.blobs, "repo")
	for n, r := range reads {
		rd, err := c.reader(context.Background(), dgsts[r.blob], r.off)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, r.size)
		if _, err := io.ReadFull(rd, got); err != nil {
			t.Fatalf("read %d: %v", n, err)
		}
		if !bytes.Equal(got, blobs[r.blob][r.off:r.off+r.size]) {
			t.Fatalf("read %d (blob %d at %d): wrong bytes", n, r.blob, r.off)
		}
		if open := f.blobs.stillOpen(); open > openBlobs {
			t.Fatalf("%d blobs open, at most %d allowed", open, openBlobs)
		}
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if open := f.blobs.stillOpen(); open != 0 {
		t.Errorf("%d blobs left open", open)
	}
}
