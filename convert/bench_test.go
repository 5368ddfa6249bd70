package convert

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// cpuTime is the user+system CPU time of the process so far: on a shared
// machine it measures the work a conversion costs better than wall time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchLayerSize is the uncompressed size of the synthetic benchmark layer.
const benchLayerSize = 200 << 20

// writeBenchTar writes a ~200 MB tar of mixed files: many small text-like
// files, some medium binaries, a few large partly compressible files and
// some incompressible data, like a typical application image.
func writeBenchTar(b *testing.B, p string) int64 {
	f, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	bw := bufio.NewWriterSize(f, 1<<20)
	tw := tar.NewWriter(bw)
	r := rand.New(rand.NewSource(42))
	text := pseudoRandom(1, 4<<20) // compressible "source code"
	noise := make([]byte, 4<<20)   // incompressible
	r.Read(noise)
	var total int64
	for i := 0; total < benchLayerSize; i++ {
		var size int
		var src []byte
		switch k := i % 100; {
		case k < 85: // small text files
			size, src = 512+r.Intn(32<<10), text
		case k < 95: // medium binaries: text mixed with noise
			size, src = 64<<10+r.Intn(1<<20), text
		case k < 98: // large partly compressible files
			size, src = 2<<20+r.Intn(6<<20), text
		default: // compressed archives, images
			size, src = 256<<10+r.Intn(2<<20), noise
		}
		data := make([]byte, size)
		for off := 0; off < size; {
			start := r.Intn(len(src) - 1)
			n := copy(data[off:], src[start:])
			off += n
			if i%100 >= 85 && i%100 < 95 && off < size { // mix in noise
				off += copy(data[off:], noise[r.Intn(len(noise)-4096):][:min(4096, size-off)])
			}
		}
		hdr := &tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("usr/lib/pkg%03d/file%05d", i%300, i),
			Mode: 0644, Size: int64(size), ModTime: baseTime}
		if err := tw.WriteHeader(hdr); err != nil {
			b.Fatal(err)
		}
		tw.Write(data)
		total += int64(size)
	}
	if err := tw.Close(); err != nil {
		b.Fatal(err)
	}
	if err := bw.Flush(); err != nil {
		b.Fatal(err)
	}
	st, _ := f.Stat()
	return st.Size()
}

// BenchmarkConvertLayer measures ConvertLayer on a synthetic ~200 MB layer
// (uncompressed input), against compressing the same tar with plain
// gzip -6 (compress/gzip, single stream) as the baseline.
//
//	go test -run '^$' -bench ConvertLayer -benchtime 3x ./convert/
func BenchmarkConvertLayer(b *testing.B) {
	dir := b.TempDir()
	src := filepath.Join(dir, "layer.tar")
	t0 := time.Now()
	size := writeBenchTar(b, src)
	b.Logf("generated %d MB tar in %s", size>>20, time.Since(t0).Round(time.Millisecond))

	b.Run("estargz", func(b *testing.B) {
		b.SetBytes(size)
		var out int64
		cpu0 := cpuTime()
		for b.Loop() {
			f, err := os.Open(src)
			if err != nil {
				b.Fatal(err)
			}
			l, err := ConvertLayer(context.Background(), f, Options{TempDir: dir})
			f.Close()
			if err != nil {
				b.Fatal(err)
			}
			out = l.Desc.Size
			l.Close()
		}
		b.ReportMetric((cpuTime()-cpu0).Seconds()/float64(b.N), "cpu-s/op")
		b.ReportMetric(float64(out)/float64(size)*100, "%size")
	})
	b.Run("gzip-6", func(b *testing.B) {
		b.SetBytes(size)
		var out int64
		cpu0 := cpuTime()
		for b.Loop() {
			f, err := os.Open(src)
			if err != nil {
				b.Fatal(err)
			}
			o, err := os.CreateTemp(dir, "gz-*")
			if err != nil {
				b.Fatal(err)
			}
			zw, _ := gzip.NewWriterLevel(o, 6)
			if _, err := io.Copy(zw, f); err != nil {
				b.Fatal(err)
			}
			zw.Close()
			out, _ = o.Seek(0, io.SeekCurrent)
			f.Close()
			removeTemp(o)
		}
		b.ReportMetric((cpuTime()-cpu0).Seconds()/float64(b.N), "cpu-s/op")
		b.ReportMetric(float64(out)/float64(size)*100, "%size")
	})
}
