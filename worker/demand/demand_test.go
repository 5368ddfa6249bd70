package demand

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
	"github.com/starlight-project/starlight/api/remote"
	"github.com/starlight-project/starlight/worker/internal/fakeregistry"
	"github.com/starlight-project/starlight/worker/store"
)

// demandSetup is a store expecting the contents of img's bundle, nothing
// of which arrives unless fetched on demand, and a fetcher that knows
// where they are.
func demandSetup(t *testing.T, reg *fakeregistry.Registry) (*store.Store, *api.BundleHeader) {
	st, h, _ := demandStreamSetup(t, reg)
	return st, h
}

func demandStreamSetup(t *testing.T, reg *fakeregistry.Registry) (*store.Store, *api.BundleHeader, *Stream) {
	t.Helper()
	host := fakeregistry.Start(t, reg)
	st, err := store.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	f := New(ctx, st, 4, nil)
	h := reg.Image.Header(nil)
	if err := st.ExpectHeader(h); err != nil {
		t.Fatal(err)
	}
	rc := remote.New(remote.Options{Hosts: remote.StaticHosts(func(string) remote.HostConfig {
		return remote.HostConfig{PlainHTTP: true, Username: reg.User, Password: reg.Password}
	})})
	ds := f.Add(rc, host, "app", h)
	t.Cleanup(ds.Close)
	return st, h, ds
}

func readWithin(st *store.Store, d string, p []byte, off int64, timeout time.Duration) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return st.ReadAt(ctx, digest.Digest(d), p, off)
}

func entryNamed(t *testing.T, h *api.BundleHeader, name string) api.Entry {
	t.Helper()
	for _, l := range h.Layers {
		for _, e := range l.Entries {
			if e.Name == name {
				return e
			}
		}
	}
	t.Fatalf("no entry %s", name)
	return api.Entry{}
}

// TestDemandFetch: a read of a content the bundle has not brought is served
// from a ranged GET of the layer blob, which asks for the chunks the read
// covers and, when the read continues what arrived, those up to
// store.DemandAhead past it.
func TestDemandFetch(t *testing.T) {
	big := make([]byte, 5<<20+123)
	rand.New(rand.NewSource(1)).Read(big)
	small := []byte("hello on demand\n")
	img := fakeregistry.BuildImage(t, 1<<20, []fakeregistry.File{
		{Name: "small", Type: api.TypeReg, Mode: 0o644, Data: small},
		{Name: "big", Type: api.TypeReg, Mode: 0o644, Data: big},
	})
	reg := &fakeregistry.Registry{Image: img, User: "alice", Password: "s3cret"}
	st, h := demandSetup(t, reg)

	e := entryNamed(t, h, "small")
	p := make([]byte, 100)
	n, err := readWithin(st, e.Digest, p, 0, 10*time.Second)
	if err != nil && !errors.Is(err, io.EOF) {
		t.Fatalf("read of small: %v", err)
	}
	if !bytes.Equal(p[:n], small) {
		t.Fatalf("read %q, want %q", p[:n], small)
	}
	if !waitFor(func() bool { return st.Has(digest.Digest(e.Digest)) }) {
		t.Fatal("small is not complete after its only chunk was fetched")
	}

	// A 4 KiB read at 2.5 MiB of big, whose chunk 1 has not arrived:
	// chunk 2 only.
	eb := entryNamed(t, h, "big")
	p = make([]byte, 4096)
	if _, err := readWithin(st, eb.Digest, p, 5<<19, 10*time.Second); err != nil {
		t.Fatalf("read of big: %v", err)
	}
	if !bytes.Equal(p, big[5<<19:5<<19+4096]) {
		t.Fatal("big: wrong bytes")
	}
	c2, c3 := eb.Chunks[2], eb.Chunks[3]
	want := fmt.Sprintf("bytes=%d-%d", c2.CompressedOffset, c2.CompressedOffset+c2.CompressedSize-1)
	ranges := reg.BlobRanges()
	if len(ranges) != 2 || ranges[1] != want {
		t.Fatalf("blob GETs with ranges %q, want the second to be %q", ranges, want)
	}
	// A read continuing chunk 2 asks for chunk 3 and 1 MiB ahead: chunk 4.
	if _, err := readWithin(st, eb.Digest, p, c3.Offset+10, 10*time.Second); err != nil {
		t.Fatalf("read of big: %v", err)
	}
	c4 := eb.Chunks[4]
	want = fmt.Sprintf("bytes=%d-%d", c3.CompressedOffset, c4.CompressedOffset+c4.CompressedSize-1)
	if ranges := reg.BlobRanges(); len(ranges) != 3 || ranges[2] != want {
		t.Fatalf("blob GETs with ranges %q, want the third to be %q", ranges, want)
	}
	// Chunks 0 and 1 did not arrive: a read of them blocks (and
	// demands them in turn).
	if !waitFor(func() bool {
		_, err := readWithin(st, eb.Digest, p, 1<<20, 50*time.Millisecond)
		return err == nil
	}) {
		t.Fatal("chunk 1 of big never arrived")
	}
}

// TestDemandFetchCorrupt: data that does not match its chunk digest is
// never stored; the read keeps waiting, and the bundle serves it.
func TestDemandFetchCorrupt(t *testing.T) {
	data := []byte("the registry's storage flipped bits\n")
	img := fakeregistry.BuildImage(t, 1<<20, []fakeregistry.File{{Name: "f", Type: api.TypeReg, Mode: 0o644, Data: data}})
	reg := &fakeregistry.Registry{Image: img, CorruptBlobs: true}
	st, h := demandSetup(t, reg)
	e := entryNamed(t, h, "f")

	p := make([]byte, len(data))
	if _, err := readWithin(st, e.Digest, p, 0, 300*time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("read with a corrupt blob: %v, want it still waiting", err)
	}
	if len(reg.BlobRanges()) == 0 {
		t.Fatal("no blob GET")
	}
	// The bundle delivers.
	fr := h.Frames[0]
	raw, err := bundle.Decode(fr, bytes.NewReader(img.Members[fakeregistry.MemberKey(fr.Digest, fr.Offset)]))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.WriteChunk(fr, raw); err != nil {
		t.Fatal(err)
	}
	n, err := readWithin(st, e.Digest, p, 0, 10*time.Second)
	if err != nil || !bytes.Equal(p[:n], data) {
		t.Fatalf("read after the bundle: %q, %v", p[:n], err)
	}
}

func waitFor(cond func() bool) bool {
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return false
}

// TestDemandLeftToStream: a read whose chunk the stream is about to bring
// (at the stream's measured rate, sooner than a round trip) is not fetched.
func TestDemandLeftToStream(t *testing.T) {
	img := fakeregistry.BuildImage(t, 1<<20, []fakeregistry.File{
		{Name: "a", Type: api.TypeReg, Mode: 0o644, Data: []byte("first in the stream\n")},
		{Name: "b", Type: api.TypeReg, Mode: 0o644, Data: []byte("second in the stream\n")},
	})
	reg := &fakeregistry.Registry{Image: img}
	st, h, ds := demandStreamSetup(t, reg)
	// The stream has started and runs at about 1 GB/s: b, a few bytes
	// ahead, arrives long before a GET could.
	ds.Received(0)
	time.Sleep(100 * time.Millisecond)
	ds.Received(100 << 20)
	e := entryNamed(t, h, "b")
	if _, err := readWithin(st, e.Digest, make([]byte, 4), 0, 200*time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("read: %v, want it waiting for the stream", err)
	}
	if r := reg.BlobRanges(); len(r) != 0 {
		t.Fatalf("blob GETs %q for a chunk the stream brings sooner", r)
	}
}
