package fs

import (
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

// TestReadHookWithoutPassthrough checks the hooks a traced view relies on:
// with passthrough off, the reads of a complete content reach OnRead with
// the file's name, offset and length, and OnOpen sees the first open only.
func TestReadHookWithoutPassthrough(t *testing.T) {
	requireFUSE(t)
	s := openStore(t)
	big := randomContent(t, 7, 300_000, 100_000)
	big.put(t, s)
	type read struct {
		name      string
		off, size int64
	}
	var (
		mu     sync.Mutex
		opened []string
		reads  []read
	)
	mnt := mountLayer(t, s, []api.Entry{big.entry("data/big", 0o644)}, func(o *Options) {
		o.NoPassthrough = true
		o.OnOpen = func(_ digest.Digest, name string) {
			mu.Lock()
			opened = append(opened, name)
			mu.Unlock()
		}
		o.OnRead = func(_ digest.Digest, name string, off, size int64) {
			mu.Lock()
			reads = append(reads, read{name, off, size})
			mu.Unlock()
		}
	})
	f, err := os.Open(filepath.Join(mnt, "data/big"))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 10)
	if _, err := f.ReadAt(buf, 250_000); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if b, err := os.ReadFile(filepath.Join(mnt, "data/big")); err != nil || !reflect.DeepEqual(b, big.data) {
		t.Fatalf("read through the traced view: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if !reflect.DeepEqual(opened, []string{"data/big"}) {
		t.Fatalf("opened %q", opened)
	}
	if len(reads) == 0 || reads[0].name != "data/big" || reads[0].off > 250_000 || reads[0].off+reads[0].size < 250_010 {
		t.Fatalf("reads %+v, want the first to cover [250000, 250010)", reads)
	}
}
