package store

import (
	"bytes"
	"context"
	"testing"

	"github.com/starlight-project/starlight/api/bundle"
)

// BenchmarkReceiveSmallFiles measures the per-content cost of the receive
// path (expect, write, verify, rename) on an image-like bundle: thousands
// of small files, as in a Debian rootfs.
//
//	go test -run ^$ -bench ReceiveSmallFiles ./worker/store
func BenchmarkReceiveSmallFiles(b *testing.B) {
	const files = 2000
	cs := make([]*testContent, files)
	for i := range cs {
		cs[i] = newContent(b, int64(i), 4096+i%8192, 1<<20)
	}
	raw := bundleOf(b, 0, cs...)
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		s := openStore(b)
		br, err := bundle.NewReader(bytes.NewReader(raw))
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := s.ExpectHeader(br.Header()); err != nil {
			b.Fatal(err)
		}
		if err := s.Receive(context.Background(), br, nil); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N*files), "µs/file")
}
