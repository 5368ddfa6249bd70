package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// gzipBomb returns a gzip stream of a tar holding one file of n zero bytes
// (n a multiple of 1 MiB), about n/1000 bytes long: the compressed member
// of 1 MiB of zeros, repeated.
func gzipBomb(t *testing.T, n int64) []byte {
	t.Helper()
	var hdr bytes.Buffer
	tw := tar.NewWriter(&hdr)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "zeros", Mode: 0o644, Size: n, ModTime: baseTime}); err != nil {
		t.Fatal(err)
	}
	tw.Flush()
	out := bytes.NewBuffer(gzipBytes(t, hdr.Bytes()))
	mib := gzipBytes(t, make([]byte, 1<<20))
	for i := int64(0); i < n>>20; i++ {
		out.Write(mib)
	}
	out.Write(gzipBytes(t, make([]byte, 1024))) // end-of-archive marker
	return out.Bytes()
}

// mountTmpfs mounts a tmpfs of size bytes on a new directory, unmounted
// at the end of the test. It returns "" when the test is not root.
func mountTmpfs(t *testing.T, size int64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		return ""
	}
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// TestConvertLayerLimits checks that the limits of Options fail a layer as
// invalid at once, with the limit in the message, and leave nothing behind.
func TestConvertLayerLimits(t *testing.T) {
	many := make([]tarEntry, 101)
	for i := range many {
		many[i] = tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("f%03d", i), Mode: 0o644, ModTime: baseTime}}
	}
	longNames := make([]tarEntry, 500)
	for i := range longNames {
		data := []byte(fmt.Sprint(i))
		longNames[i] = tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%0200d", i), Mode: 0o644, Size: int64(len(data)), ModTime: baseTime}, data: data}
	}
	for _, tc := range []struct {
		name   string
		layer  func() []byte
		limits func(*testing.T, *Options)
		want   string
	}{
		// 1 MB of gzip that decompresses to 1 GiB of zeros.
		{"gzip bomb", func() []byte { return gzipBomb(t, 1<<30) }, func(_ *testing.T, o *Options) { o.MaxUncompressedSize = 64 << 20 },
			"layer: uncompressed size exceeds 67108864 bytes, the limit per layer"},
		{"entries", func() []byte { return buildTar(t, many) }, func(_ *testing.T, o *Options) { o.MaxEntries = 100 },
			"layer: more than 100 entries, the limit of entries per layer"},
		{"TOC", func() []byte { return gzipBytes(t, buildTar(t, longNames)) }, func(t *testing.T, _ *Options) {
			old := tocLimit
			tocLimit = 64 << 10
			t.Cleanup(func() { tocLimit = old })
		}, "eStargz TOC larger than 65536 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts, tmps := testOptions(t)
			// As root, the spool is a tmpfs smaller than the bomb: a limit
			// that let it be written would fail with ENOSPC instead.
			if tmp := mountTmpfs(t, 96<<20); tmp != "" {
				opts.TempDir = tmp
				tmps = append(tmps, tmp)
			} else {
				t.Log("SKIPPED part: not root, the spool is not bounded by a tmpfs")
			}
			tc.limits(t, &opts)
			l, err := ConvertLayer(context.Background(), bytes.NewReader(tc.layer()), opts)
			if err == nil {
				l.Close()
				t.Fatal("ConvertLayer accepted the layer")
			}
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q: want ErrInvalid with %q", err, tc.want)
			}
			for _, d := range tmps {
				assertEmptyDir(t, d)
			}
		})
	}

	// Within the limits, the same layers convert.
	opts, _ := testOptions(t)
	opts.MaxEntries = 101
	l, err := ConvertLayer(context.Background(), bytes.NewReader(buildTar(t, many)), opts)
	if err != nil {
		t.Fatalf("101 entries with a limit of 101: %v", err)
	}
	l.Close()
}

// TestConvertLayerReplacedParent: a name that an earlier entry made a file
// and a later one a directory again may have children, as in tar.
func TestConvertLayerReplacedParent(t *testing.T) {
	opts, _ := testOptions(t)
	layer := buildTar(t, []tarEntry{
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "a", Mode: 0o644, Size: 1, ModTime: baseTime}, data: []byte("x")},
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "a/", Mode: 0o755, ModTime: baseTime}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "a/b", Mode: 0o644, Size: 1, ModTime: baseTime}, data: []byte("y")},
	})
	l, err := ConvertLayer(context.Background(), bytes.NewReader(layer), opts)
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
}

// TestConvertLayerTempDirFull fills the spool directory (a small tmpfs):
// the error names the directory and says it is full, is not ErrInvalid
// (the job is retried), and nothing is left behind; with space back, the
// same layer converts.
func TestConvertLayerTempDirFull(t *testing.T) {
	tmp := mountTmpfs(t, 4<<20)
	if tmp == "" {
		t.Skip("SKIPPED: mounting a tmpfs needs root")
	}
	opts, _ := testOptions(t)
	opts.TempDir = tmp
	layer := gzipBytes(t, buildTar(t, []tarEntry{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "big", Mode: 0o644, Size: 8 << 20, ModTime: baseTime},
		data: pseudoRandom(3, 8<<20)}}))
	_, err := ConvertLayer(context.Background(), bytes.NewReader(layer), opts)
	if err == nil || errors.Is(err, ErrInvalid) || !errors.Is(err, syscall.ENOSPC) ||
		!strings.Contains(err.Error(), "temporary directory "+tmp+" is full") {
		t.Fatalf("error %v: want a retryable ENOSPC naming %s", err, tmp)
	}
	t.Logf("error: %v", err)
	assertEmptyDir(t, tmp)

	opts.TempDir = filepath.Join(t.TempDir(), "roomy")
	if err := os.Mkdir(opts.TempDir, 0o700); err != nil {
		t.Fatal(err)
	}
	l, err := ConvertLayer(context.Background(), bytes.NewReader(layer), opts)
	if err != nil {
		t.Fatalf("with space: %v", err)
	}
	defer l.Close()
	blob, _ := io.ReadAll(l.File)
	if _, err := ReadIndex(bytes.NewReader(blob), int64(len(blob))); err != nil {
		t.Fatal(err)
	}
}

// TestConvertLayerOfEmptyFiles converts a layer of many empty files and
// 34 MiB of tar headers (long PAX comments) but no contents: estargz used
// to build it in one part per file, each with its goroutine and open
// temporary file, until the registry ran out of file descriptors ("too
// many open files" for a layer of 100,000 empty files).
func TestConvertLayerOfEmptyFiles(t *testing.T) {
	entries := make([]tarEntry, 5000)
	for i := range entries {
		entries[i] = tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("usr/share/doc/pkg%03d/file%06d", i/1000, i), Mode: 0o644, ModTime: baseTime}}
	}
	for i := range 40 { // 900 KiB each: tar's limit of a PAX header is 1 MiB
		entries[i].hdr.Format = tar.FormatPAX
		entries[i].hdr.PAXRecords = map[string]string{"comment": strings.Repeat("x", 900<<10)}
	}
	layer := gzipBytes(t, buildTar(t, entries))
	opts, _ := testOptions(t)
	stop, maxFDs := make(chan struct{}), make(chan int)
	go func() {
		most := 0
		for {
			select {
			case <-stop:
				maxFDs <- most
				return
			default:
			}
			if ents, err := os.ReadDir("/proc/self/fd"); err == nil && len(ents) > most {
				most = len(ents)
			}
		}
	}()
	l, err := ConvertLayer(context.Background(), bytes.NewReader(layer), opts)
	close(stop)
	most := <-maxFDs
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if len(l.Index.Entries) != len(entries) {
		t.Errorf("%d entries indexed", len(l.Index.Entries))
	}
	if most > 200 {
		t.Errorf("%d files open at once while converting", most)
	}
	t.Logf("at most %d files open", most)
}
