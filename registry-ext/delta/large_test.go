package delta

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
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

// TestServeLargeImageMemory measures what streams of a 100k-file image
// hold in memory: 20 clients read the bundle header and then stop
// reading, so that every stream is in the middle of its frames; the live
// heap they add is logged per stream. A stream holds its buffers only:
// the plan (trees, frames, sources) is spooled once and shared.
func TestServeLargeImageMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("large index")
	}
	const files, streams = 100_000, 20
	f := newFixture(t)
	l := &tlayer{digest: digest.FromString("large layer"), diffID: digest.FromString("large diff"), size: files * 100}
	for i := range files {
		l.entries = append(l.entries, oneChunkFile(fmt.Sprintf("usr/share/doc/f%06d", i), digest.FromString(fmt.Sprint(i)).String(), int64(i)*100))
	}
	f.index(l, l.digest)
	// The blob is zeros (sparse): the clients never decode a frame.
	blob, err := os.Create(filepath.Join(f.blobs.dir, l.digest.Encoded()))
	if err != nil {
		t.Fatal(err)
	}
	if err := blob.Truncate(l.size); err != nil {
		t.Fatal(err)
	}
	blob.Close()
	m := f.image("large", l)
	p := f.planner()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.ServeDelta(w, r, api.DeltaRequest{HeaderVersion: bundle.Version}, m, "large")
	}))
	defer srv.Close()

	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	base := heap()
	var bodies []io.Closer
	defer func() {
		for _, b := range bodies {
			b.Close()
		}
	}()
	start := time.Now()
	for range streams {
		resp, err := http.Post(srv.URL, "application/json", nil)
		if err != nil {
			t.Fatal(err)
		}
		bodies = append(bodies, resp.Body)
		br, err := bundle.NewReader(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		if n := len(br.Header().Frames); n != files {
			t.Fatalf("%d frames, want %d", n, files)
		}
	}
	held := heap()
	perStream := (int64(held) - int64(base)) / streams
	t.Logf("100k files, %d stalled streams: live heap %+d MiB in all, %+.1f MiB per stream (headers received in %v)",
		streams, (int64(held)-int64(base))>>20, float64(perStream)/(1<<20), time.Since(start).Round(time.Millisecond))
	// A stream holds buffers (a blob's read-ahead, the spool's), never
	// the plan: a few hundred kilobytes, against some 150 MB when every
	// stream kept its plan.
	if perStream > 4<<20 {
		t.Errorf("each stream holds %d MiB of live heap", perStream>>20)
	}
}
