package trace

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

const mib = 1 << 20

func testTree(layer string) *api.LayerTree {
	return &api.LayerTree{Digest: layer, Entries: []api.Entry{
		{Name: "bin", Type: api.TypeDir},
		{Name: "bin/sh", Type: api.TypeReg, Size: 10, Digest: "sha256:aa"},
		{Name: "etc/a", Type: api.TypeReg, Size: 3, Digest: "sha256:a1"},
		{Name: "etc/empty", Type: api.TypeReg},
		{Name: "big", Type: api.TypeReg, Size: 3*mib + 5, Digest: "sha256:b1", Chunks: []api.Chunk{
			{Offset: 0, Size: mib}, {Offset: mib, Size: mib}, {Offset: 2 * mib, Size: mib}, {Offset: 3 * mib, Size: 5},
		}},
		{Name: "link", Type: api.TypeSymlink, LinkName: "bin/sh"},
	}}
}

// op is one hook call: an open, or a read of [off, off+size).
type op struct {
	layer     *Layer
	name      string
	read      bool
	off, size int64
}

func TestRecorder(t *testing.T) {
	l1 := NewLayer(testTree("sha256:l1"))
	l2 := NewLayer(testTree("sha256:l2"))
	acc := func(l *Layer, name, d string, chunk int64, ms int) api.TraceAccess {
		return api.TraceAccess{Layer: l.Digest(), Name: name, Digest: d, ChunkOffset: chunk, TimeNS: int64(ms) * int64(time.Millisecond)}
	}
	tests := []struct {
		name string
		ops  []op
		want []api.TraceAccess
	}{
		{
			name: "first access only, in order",
			ops:  []op{{layer: l1, name: "etc/a"}, {layer: l1, name: "bin/sh"}, {layer: l1, name: "etc/a"}, {layer: l1, name: "etc/empty"}},
			want: []api.TraceAccess{acc(l1, "etc/a", "sha256:a1", 0, 1), acc(l1, "bin/sh", "sha256:aa", 0, 2), acc(l1, "etc/empty", "", 0, 4)},
		},
		{
			name: "same name in two layers is two files",
			ops:  []op{{layer: l2, name: "bin/sh"}, {layer: l1, name: "bin/sh"}, {layer: l2, name: "bin/sh"}},
			want: []api.TraceAccess{acc(l2, "bin/sh", "sha256:aa", 0, 1), acc(l1, "bin/sh", "sha256:aa", 0, 2)},
		},
		{
			name: "reads record each chunk they cover once",
			ops: []op{
				{layer: l1, name: "big"},
				{layer: l1, name: "big", read: true, off: 0, size: 128 << 10},
				{layer: l1, name: "big", read: true, off: 2*mib + 10, size: mib},
				{layer: l1, name: "big", read: true, off: mib - 1, size: 2},
				{layer: l1, name: "big", read: true, off: 3 * mib, size: 5},
			},
			want: []api.TraceAccess{
				acc(l1, "big", "sha256:b1", 0, 1),
				acc(l1, "big", "sha256:b1", 2*mib, 3), acc(l1, "big", "sha256:b1", 3*mib, 3),
				acc(l1, "big", "sha256:b1", mib, 4),
			},
		},
		{
			name: "a read without open records its chunk",
			ops:  []op{{layer: l1, name: "big", read: true, off: mib + 7, size: 1}},
			want: []api.TraceAccess{acc(l1, "big", "sha256:b1", mib, 1)},
		},
		{
			name: "reads of single-chunk files, unknown names and non-files are ignored",
			ops: []op{
				{layer: l1, name: "etc/a", read: true, off: 0, size: 3},
				{layer: l1, name: "nothere"}, {layer: l1, name: "bin"}, {layer: l1, name: "link"},
				{layer: l1, name: "big", read: true, off: 0, size: 0},
			},
			want: nil,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Unix(1000, 0)
			r := NewRecorder(start)
			tick := 0
			r.SetClock(func() time.Time { return start.Add(time.Duration(tick) * time.Millisecond) })
			for _, o := range tt.ops {
				tick++
				if o.read {
					r.Read(o.layer, o.name, o.off, o.size)
				} else {
					r.Open(o.layer, o.name)
				}
			}
			got := r.Snapshot()
			if !reflect.DeepEqual(got.Accesses, tt.want) {
				t.Fatalf("accesses\n got %+v\nwant %+v", got.Accesses, tt.want)
			}
		})
	}
}

func TestRecorderHooksSealBoundRestart(t *testing.T) {
	l := NewLayer(testTree("sha256:l1"))
	start := time.Unix(1000, 0)
	r := NewRecorder(start)
	now := start.Add(5 * time.Second)
	r.SetClock(func() time.Time { return now })

	// Nothing recorded yet: the clock moves to the mount.
	r.Restart(start.Add(4 * time.Second))
	onOpen, onRead := r.Hooks(l)
	onOpen(digest.Digest("sha256:other"), "etc/a") // another layer's view
	onOpen(digest.Digest(l.Digest()), "etc/a")
	onRead(digest.Digest(l.Digest()), "big", mib, 1)
	r.Restart(now) // too late: accesses exist
	if s := r.Snapshot(); len(s.Accesses) != 2 || s.Accesses[0].TimeNS != int64(time.Second) || !s.Start.Equal(start.Add(4*time.Second)) {
		t.Fatalf("after hooks: %+v", s)
	}

	r.SetMax(3)
	r.Open(l, "bin/sh")
	r.Open(l, "etc/empty") // beyond the bound
	sealed := r.Seal()
	r.Open(l, "big")
	if s := r.Snapshot(); len(s.Accesses) != 3 || s.Dropped != 1 || !r.Sealed() || !reflect.DeepEqual(s, sealed) {
		t.Fatalf("after seal: %+v (sealed %+v)", s, sealed)
	}
}

func TestDir(t *testing.T) {
	root := filepath.Join(t.TempDir(), "pending")
	d, err := OpenDir(root)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)
	older := &Trace{ID: NewID(start), Ref: "reg:5000/app:v1", Registry: "reg:5000", PlainHTTP: true, Partial: true,
		Report: api.TraceReport{Repository: "app", ManifestDigest: "sha256:m", Container: "c1", StartedAt: start,
			Accesses: []api.TraceAccess{{Layer: "sha256:l", Name: "etc/a", Digest: "sha256:a", TimeNS: 5}}}}
	newer := &Trace{ID: NewID(start.Add(time.Second)), Ref: "reg:5000/app:v1", Registry: "reg:5000",
		Report: api.TraceReport{Repository: "app", StartedAt: start.Add(time.Second)}}
	for _, tr := range []*Trace{newer, older} {
		if err := d.Save(tr); err != nil {
			t.Fatal(err)
		}
	}
	older.Partial = false // a later write replaces the checkpoint
	if err := d.Save(older); err != nil {
		t.Fatal(err)
	}
	// Junk in the directory does not break the listing.
	os.WriteFile(filepath.Join(root, "notes.txt"), []byte("x"), 0o600)
	list, err := d.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || !reflect.DeepEqual(list[0], older) || !reflect.DeepEqual(list[1], newer) {
		t.Fatalf("list %+v", list)
	}
	// The on-disk form is the registry's report plus the routing.
	b, _ := os.ReadFile(filepath.Join(root, older.ID+".json"))
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil || !bytes.Contains(raw["report"], []byte(`"name":"etc/a","digest":"sha256:a","timeNs":5`)) ||
		string(raw["registry"]) != `"reg:5000"` {
		t.Fatalf("file %s", b)
	}
	if err := d.Remove(older.ID); err != nil {
		t.Fatal(err)
	}
	if err := d.Remove(older.ID); err != nil {
		t.Fatalf("removing twice: %v", err)
	}
	if _, err := d.Get(older.ID); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("get removed: %v", err)
	}
	for _, id := range []string{"", "../x", "A", "a/b", "a.json"} {
		if err := d.Save(&Trace{ID: id}); err == nil {
			t.Errorf("Save(%q) succeeded", id)
		}
	}
	// A corrupt file is reported, the others are listed.
	os.WriteFile(filepath.Join(root, "123-bad.json"), []byte("{"), 0o600)
	list, err = d.List()
	if err == nil || len(list) != 1 || list[0].ID != newer.ID {
		t.Fatalf("list with a corrupt file: %v, %v", list, err)
	}
}
