package delta

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
)

// TestPlanLargeImage plans an image of 100k files (index rows only: Plan
// never reads layer blobs) and encodes its header.
func TestPlanLargeImage(t *testing.T) {
	if testing.Short() {
		t.Skip("large index")
	}
	const files = 100_000
	f := newFixture(t)
	l := &tlayer{digest: digest.FromString("large layer"), diffID: digest.FromString("large diff"), size: files * 100}
	tx, err := f.db.Begin()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(`INSERT INTO layers (digest, diff_id, size, toc_digest, uncompressed_size, files, created_at)
		VALUES (?, ?, ?, ?, 0, ?, 0)`, l.digest.String(), l.diffID.String(), l.size, l.digest.String(), files); err != nil {
		t.Fatal(err)
	}
	for i := range files {
		// Every tenth file repeats the content of the file before it.
		d := digest.FromString(fmt.Sprint(i - i%10/9)).String()
		if _, err := tx.Exec(`INSERT INTO files (layer_digest, position, name, type, mode, uid, gid, size, mtime, digest)
			VALUES (?, ?, ?, 'reg', 420, 0, 0, 10, 0, ?)`, l.digest.String(), i, fmt.Sprintf("usr/share/doc/f%06d", i), d); err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(`INSERT INTO chunks (layer_digest, file_position, chunk_offset, chunk_size, chunk_digest,
			compressed_offset, compressed_size) VALUES (?, ?, 0, 10, ?, ?, 100)`, l.digest.String(), i, d, i*100); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	m := f.image("large", l)

	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	h, srcs, err := f.planner().Plan(context.Background(), "large", m, api.DeltaRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(h.Layers[0].Entries) != files || len(h.Frames) != len(srcs) || h.Stats.Files != files {
		t.Fatalf("%d entries, %d frames, %d sources", len(h.Layers[0].Entries), len(h.Frames), len(srcs))
	}
	if want := files - files/10; len(h.Frames) != want || h.Stats.Contents != want {
		t.Errorf("%d frames, %d contents, want %d distinct contents", len(h.Frames), h.Stats.Contents, want)
	}
	cw := &countWriter{}
	if _, err := bundle.NewWriter(cw, h); err != nil {
		t.Fatal(err)
	}
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	t.Logf("100k files: header %d bytes on the wire, %d MiB allocated while planning and encoding",
		cw.n, (after.TotalAlloc-before.TotalAlloc)>>20)
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

var _ io.Writer = (*countWriter)(nil)
