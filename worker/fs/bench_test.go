package fs

import (
	"io"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/starlight-project/starlight/api"
)

const benchSize = 128 << 20

// BenchmarkRead compares the read throughput of a large, arrived file:
// straight from the store, through the mount with passthrough, and through
// the mount served by this process (a handle opened before the content was
// complete), with and without the kernel page cache.
//
//	go test -run '^$' -bench BenchmarkRead ./worker/fs/
func BenchmarkRead(b *testing.B) {
	requireFUSE(b)
	s := openStore(b)
	c := randomContent(b, 42, benchSize, 4<<20)
	c.expect(b, s)
	mnt := mountLayer(b, s, []api.Entry{c.entry("big", 0o644)})
	path := filepath.Join(mnt, "big")

	// Open a handle before the content completes: while it is open,
	// further opens cannot use passthrough (the kernel does not mix the
	// two modes on an inode), so "fuse" reads go through this process.
	early, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	for i := range c.frames {
		c.write(b, s, i)
	}
	storePath, _ := s.Path(c.d)

	read := func(b *testing.B, p string, dropCache bool) {
		buf := make([]byte, 1<<20)
		b.SetBytes(benchSize)
		for b.Loop() {
			f, err := os.Open(p)
			if err != nil {
				b.Fatal(err)
			}
			if dropCache {
				unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
			}
			n, err := io.CopyBuffer(io.Discard, f, buf)
			f.Close()
			if err != nil || n != benchSize {
				b.Fatalf("read %d bytes: %v", n, err)
			}
		}
	}
	b.Run("store", func(b *testing.B) { read(b, storePath, false) })
	b.Run("fuse-pagecache", func(b *testing.B) { read(b, path, false) })
	b.Run("fuse-uncached", func(b *testing.B) { read(b, path, true) })
	early.Close()
	// Release reaches the server asynchronously; a fresh open may still
	// see the early handle and fall back to FUSE reads. Count to know.
	before := servedReads.Load()
	b.Run("passthrough", func(b *testing.B) { read(b, path, false) })
	if n := servedReads.Load() - before; n != 0 {
		b.Logf("passthrough run: %d reads reached the server", n)
	}
}
