package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
	"github.com/starlight-project/starlight/worker/store"
)

// BenchmarkReadyPath times what a pull does between the registry's answer
// and the import into containerd, on an image of 7,000 small files (a
// Debian rootfs): decoding and validating the header, recording the
// trees, expecting the contents.
//
//	go test -run ^$ -bench ReadyPath ./worker/daemon
func BenchmarkReadyPath(b *testing.B) {
	var files []testFile
	files = append(files, testFile{name: "usr", typ: api.TypeDir, mode: 0o755})
	for i := range 7000 {
		files = append(files, testFile{name: fmt.Sprintf("usr/f%05d", i), typ: api.TypeReg, mode: 0o644, data: []byte(fmt.Sprintf("content %d\n", i))})
	}
	img := buildImage(b, 1<<20, files)
	h := img.header(nil)
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
		fm := &fakeMount{mounted: map[string]bool{}}
		l, err := OpenLayers(context.Background(), filepath.Join(dir, "layers"), st, fm.mount)
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
