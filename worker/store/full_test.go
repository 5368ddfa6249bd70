package store

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// smallDisk mounts a tmpfs of size bytes at a new directory and unmounts
// it when the test ends. It needs root.
func smallDisk(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: mounting a small tmpfs to fill needs root")
	}
	dir := filepath.Join(t.TempDir(), "disk")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
		t.Fatalf("mounting a tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting %s: %v", dir, err)
		}
	})
	return dir
}

// A full disk fails the write with ErrStorage, an error naming the store,
// the file and ENOSPC; nothing unverified becomes readable, and once there
// is space again the same content completes.
func TestStoreDiskFull(t *testing.T) {
	disk := smallDisk(t, "256k")
	s, err := Open(filepath.Join(disk, "store"))
	if err != nil {
		t.Fatal(err)
	}
	small := newContent(t, 1, 16<<10, 16<<10)
	big := newContent(t, 2, 1<<20, 128<<10) // does not fit
	for _, c := range []*testContent{small, big} {
		if err := s.Expect(c.d, int64(len(c.data)), c.chunks); err != nil {
			t.Fatal(err)
		}
	}
	if err := small.write(t, s, 0); err != nil {
		t.Fatal(err)
	}
	var werr error
	written := 0
	for i := range big.frames {
		if werr = big.write(t, s, i); werr != nil {
			break
		}
		written++
	}
	if werr == nil {
		t.Fatal("1 MiB fit in a 256 KiB tmpfs")
	}
	t.Logf("after %d chunks: %v", written, werr)
	if !errors.Is(werr, ErrStorage) || !errors.Is(werr, unix.ENOSPC) {
		t.Errorf("error does not wrap ErrStorage and ENOSPC: %v", werr)
	}
	for _, want := range []string{"ENOSPC", filepath.Join(disk, "store"), big.d.Encoded()} {
		if !strings.Contains(werr.Error(), want) {
			t.Errorf("error %q does not say %q", werr, want)
		}
	}
	// The chunk that failed is not readable; the ones before it are, and
	// match; the complete content is intact.
	if !blocked(t, s, big.d, int64(written)*(128<<10), 1) {
		t.Errorf("the chunk that failed to write is readable")
	}
	if written > 0 && !blocked(t, s, big.d, 0, 1) {
		got := readAll(t, s, big.d, 128<<10)
		if string(got) != string(big.data[:128<<10]) {
			t.Errorf("a verified chunk reads other bytes")
		}
	}
	if !s.Has(small.d) || string(readAll(t, s, small.d, len(small.data))) != string(small.data) {
		t.Errorf("the complete content did not survive the full disk")
	}
	for _, f := range contentFiles(t, s) {
		if filepath.Base(f) != small.d.Encoded() {
			t.Errorf("%s is in content/", f)
		}
	}

	// Space again: the rest arrives and the content completes.
	if err := unix.Mount("tmpfs", disk, "tmpfs", unix.MS_REMOUNT, "size=4m"); err != nil {
		t.Fatal(err)
	}
	for i := written; i < len(big.frames); i++ {
		if err := big.write(t, s, i); err != nil {
			t.Fatalf("chunk %d after space came back: %v", i, err)
		}
	}
	if !s.Has(big.d) || string(readAll(t, s, big.d, len(big.data))) != string(big.data) {
		t.Fatal("the content did not complete once space came back")
	}
}
