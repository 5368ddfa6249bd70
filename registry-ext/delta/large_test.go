package delta

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"testing"
	"time"

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
	for i := range files {
		// Every tenth file repeats the content of the file before it.
		d := digest.FromString(fmt.Sprint(i - i%10/9)).String()
		l.entries = append(l.entries, oneChunkFile(fmt.Sprintf("usr/share/doc/f%06d", i), d, int64(i)*100))
	}
	f.index(l, l.digest)
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

// oneChunkFile is a 10-byte regular file whose one chunk's gzip member
// takes 100 bytes at offset in the layer blob (index rows only: no blob
// holds it).
func oneChunkFile(name, dgst string, offset int64) api.Entry {
	return api.Entry{Name: name, Type: api.TypeReg, Mode: 0o644, Size: 10, ModTime: time.Unix(0, 0).UTC(), Digest: dgst,
		Chunks: []api.Chunk{{Offset: 0, Size: 10, Digest: dgst, CompressedOffset: offset, CompressedSize: 100}}}
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

var _ io.Writer = (*countWriter)(nil)
