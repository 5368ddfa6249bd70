package schema

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/starlight-project/starlight/api"
)

// bigLayer is a layer of n regular files of one chunk each: 2n rows.
func bigLayer(dgst string, n int) *Layer {
	mtime := time.Unix(1_600_000_000, 0).UTC()
	l := &Layer{Digest: dgst, DiffID: "sha256:d1ff", Size: int64(n), TOCDigest: "sha256:70c", UncompressedSize: int64(n)}
	for i := 0; i < n; i++ {
		d := fmt.Sprintf("sha256:%064x", i)
		l.Entries = append(l.Entries, api.Entry{Name: fmt.Sprintf("usr/share/f%06d", i), Type: api.TypeReg, Mode: 0o644,
			Size: 10, ModTime: mtime, Digest: d,
			Chunks: []api.Chunk{{Offset: 0, Size: 10, Digest: d, CompressedOffset: int64(100 + 50*i), CompressedSize: 50}}})
	}
	return l
}

// TestPutLayerLetsPushesIn indexes a layer of many batches and, once its
// first batch is in, pushes an image from another goroutine: the push
// records its job while the layer is still being indexed, instead of
// waiting for the whole layer (SQLite has one writer; a push that waited
// longer than busy_timeout failed with "database is locked").
func TestPutLayerLetsPushesIn(t *testing.T) {
	ctx := context.Background()
	db := openTest(t)
	l := bigLayer("sha256:b16", 3*IndexTxRows)
	batches := 0
	pushErr := make(chan error, 1)
	db.afterIndexBatch = func(stored int) {
		batches++
		if batches != 1 {
			return
		}
		go func() {
			_, err := db.Enqueue(ctx, Push{Repository: "small/app", Digest: "sha256:5a11", MediaType: "m", Tag: "v1"})
			pushErr <- err
		}()
		// The indexing goes on only once the push is in: with the write
		// lock held for the whole layer, this would wait for ever.
		select {
		case err := <-pushErr:
			if err != nil {
				t.Errorf("push during indexing: %v", err)
			}
		case <-time.After(2 * time.Minute):
			t.Fatalf("a push could not record its job while a layer was indexed (%d of %d entries stored)", stored, len(l.Entries))
		}
	}
	if err := db.PutLayer(ctx, l); err != nil {
		t.Fatal(err)
	}
	if batches < 6 {
		t.Errorf("%d rows indexed in %d transactions, want at most %d rows each", 2*len(l.Entries), batches, IndexTxRows)
	}
	if j, err := db.Job(ctx, "small/app", "sha256:5a11", "v1"); err != nil || j.State != jobQueued {
		t.Errorf("job of the push: %+v %v", j, err)
	}
	got, err := db.GetLayer(ctx, l.Digest)
	if err != nil || !reflect.DeepEqual(got, l) {
		t.Errorf("layer after batched indexing: %d entries, %v", len(got.Entries), err)
	}
}

// TestPutLayerResumes interrupts an indexing after two batches (a
// registry killed mid-index): the layer is not indexed, its partial rows
// show nowhere, and indexing it again completes it without duplicates.
func TestPutLayerResumes(t *testing.T) {
	db := openTest(t)
	l := bigLayer("sha256:4e5", 3*IndexTxRows)
	ctx, cancel := context.WithCancel(context.Background())
	db.afterIndexBatch = func(int) {
		if cancel != nil {
			cancel()
			cancel = nil
		}
	}
	if err := db.PutLayer(ctx, l); !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted PutLayer: %v", err)
	}
	db.afterIndexBatch = nil
	bg := context.Background()
	if ok, err := db.LayerExists(bg, l.Digest); err != nil || ok {
		t.Errorf("a partly indexed layer exists: %v %v", ok, err)
	}
	if _, err := db.GetLayer(bg, l.Digest); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetLayer of a partly indexed layer: %v", err)
	}
	if err := db.PutLayer(bg, l); err != nil {
		t.Fatal(err)
	}
	got, err := db.GetLayer(bg, l.Digest)
	if err != nil || !reflect.DeepEqual(got, l) {
		t.Fatalf("resumed layer: %v", err)
	}
}
