package pull

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"path/filepath"
	"testing"
	"time"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
	"github.com/starlight-project/starlight/worker/internal/fakeregistry"
	"github.com/starlight-project/starlight/worker/layers"
	"github.com/starlight-project/starlight/worker/store"
)

// BenchmarkReadyPath times what a pull does between the registry's answer
// and the import into containerd, on an image of 7,000 small files (a
// Debian rootfs): decoding and validating the header, recording the
// trees, expecting the contents.
//
//	go test -run ^$ -bench ReadyPath ./worker/pull
func BenchmarkReadyPath(b *testing.B) {
	var files []fakeregistry.File
	files = append(files, fakeregistry.File{Name: "usr", Type: api.TypeDir, Mode: 0o755})
	for i := range 7000 {
		files = append(files, fakeregistry.File{Name: fmt.Sprintf("usr/f%05d", i), Type: api.TypeReg, Mode: 0o644, Data: []byte(fmt.Sprintf("content %d\n", i))})
	}
	img := fakeregistry.BuildImage(b, 1<<20, files)
	h := img.Header(nil)
	var raw bytes.Buffer
	if _, err := bundle.NewWriter(&raw, h); err != nil {
		b.Fatal(err)
	}
	hj, _ := json.Marshal(h)
	b.Logf("header: %d entries, %d bytes of JSON, %d bytes on the wire", len(h.Layers[0].Entries), len(hj), raw.Len())
	var dec, add, expect time.Duration
	for range b.N {
		dir := b.TempDir()
		st, err := store.Open(filepath.Join(dir, "store"))
		if err != nil {
			b.Fatal(err)
		}
		l, err := layers.Open(context.Background(), filepath.Join(dir, "layers"), st, noMount)
		if err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		br, err := bundle.NewReader(bytes.NewReader(raw.Bytes()))
		if err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		for i := range br.Header().Layers {
			if err := l.Add(&br.Header().Layers[i]); err != nil {
				b.Fatal(err)
			}
		}
		t2 := time.Now()
		if err := st.ExpectHeader(br.Header()); err != nil {
			b.Fatal(err)
		}
		t3 := time.Now()
		dec, add, expect = dec+t1.Sub(t0), add+t2.Sub(t1), expect+t3.Sub(t2)
	}
	n := time.Duration(b.N)
	b.ReportMetric(float64((dec/n).Microseconds())/1000, "ms-decode")
	b.ReportMetric(float64((add/n).Microseconds())/1000, "ms-trees")
	b.ReportMetric(float64((expect/n).Microseconds())/1000, "ms-expect")
}

// noMount is a layers.Mounter that mounts nothing.
func noMount(string, *api.LayerTree) (io.Closer, error) { return io.NopCloser(nil), nil }
