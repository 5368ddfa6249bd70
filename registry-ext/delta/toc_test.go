package delta

import (
	"archive/tar"
	"context"
	"reflect"
	"testing"
	"time"

	"github.com/starlight-project/starlight/api"
)

// TestHeaderTreeEqualsTOC checks that the trees of a bundle header are
// what convert.ReadIndex reads from the layers' TOCs, entry for entry,
// after a round trip through the index (schema's PutLayer, SQLite, the
// planner): modes keep setuid, setgid and sticky, and a missing or zero
// mtime stays the epoch.
func TestHeaderTreeEqualsTOC(t *testing.T) {
	epoch := time.Unix(0, 0)
	mode := func(m int64) func(*tar.Header) { return func(h *tar.Header) { h.Mode = m } }
	mtime := func(m int64, t time.Time) func(*tar.Header) {
		return func(h *tar.Header) { h.Mode, h.ModTime = m, t }
	}
	want := map[string]struct {
		mode  uint32
		mtime time.Time
	}{}
	files := []tfile{}
	add := func(tf tfile, m uint32, mt time.Time) {
		files = append(files, tf)
		want[tf.name] = struct {
			mode  uint32
			mtime time.Time
		}{m, mt.UTC()}
	}
	stamp := time.Unix(1700000000, 0)
	add(tfile{name: "bin", typ: tar.TypeDir, hdr: mode(0o755)}, 0o755, stamp)
	add(tfile{name: "bin/su", content: data(1, 100), hdr: mode(0o4755)}, 0o4755, stamp)
	add(tfile{name: "bin/wall", content: data(2, 100), hdr: mode(0o2755)}, 0o2755, stamp)
	add(tfile{name: "bin/all", content: data(3, 100), hdr: mode(0o7777)}, 0o7777, stamp)
	add(tfile{name: "tmp", typ: tar.TypeDir, hdr: mode(0o1777)}, 0o1777, stamp)
	add(tfile{name: "open", typ: tar.TypeDir, hdr: mtime(0o777, epoch)}, 0o777, epoch)
	add(tfile{name: "closed", typ: tar.TypeDir, hdr: mtime(0o000, epoch)}, 0o000, epoch)
	add(tfile{name: "etc", typ: tar.TypeDir, hdr: mtime(0o755, time.Time{})}, 0o755, epoch)
	add(tfile{name: "etc/shadow", content: data(4, 10), hdr: mtime(0o000, epoch)}, 0o000, epoch)
	add(tfile{name: "etc/typebits", content: data(5, 10), hdr: mode(0o100640)}, 0o640, stamp)
	add(tfile{name: "etc/empty", hdr: mtime(0o4000, epoch)}, 0o4000, epoch)
	add(tfile{name: "etc/link", typ: tar.TypeSymlink, link: "shadow", hdr: mtime(0o777, epoch)}, 0o777, epoch)
	add(tfile{name: "etc/hard", typ: tar.TypeLink, link: "etc/shadow", hdr: mtime(0o000, epoch)}, 0o000, epoch)
	add(tfile{name: "etc/fifo", typ: tar.TypeFifo, hdr: mtime(0o1600, epoch)}, 0o1600, epoch)
	add(tfile{name: "etc/null", typ: tar.TypeChar, hdr: func(h *tar.Header) {
		h.Mode, h.ModTime, h.Devmajor, h.Devminor = 0o666, epoch, 1, 3
	}}, 0o666, epoch)
	add(tfile{name: "etc/late", content: data(6, 10), hdr: mtime(0o644, time.Unix(4102444800, 0))}, 0o644, time.Unix(4102444800, 0))
	add(tfile{name: "etc/early", content: data(7, 10), hdr: mtime(0o644, time.Unix(-86400, 0))}, 0o644, time.Unix(-86400, 0))

	f := newFixture(t)
	l := f.layer(files...)
	// The TOC says what the test meant (estargz leaves the epoch out of
	// the TOC; ReadIndex reads it back as the epoch).
	seen := 0
	for _, e := range l.entries {
		w, ok := want[e.Name]
		if !ok {
			continue
		}
		seen++
		if e.Mode != w.mode || !e.ModTime.Equal(w.mtime) {
			t.Errorf("TOC: %s has mode %#o, mtime %v; want %#o, %v", e.Name, e.Mode, e.ModTime, w.mode, w.mtime)
		}
	}
	if seen != len(want) {
		t.Fatalf("TOC lists %d of the %d files", seen, len(want))
	}

	m := f.image("odd", l)
	h, _, err := f.planner().Plan(context.Background(), "odd", m, api.DeltaRequest{})
	if err != nil {
		t.Fatal(err)
	}
	got := h.Layers[0].Entries
	if len(got) != len(l.entries) {
		t.Fatalf("header lists %d entries, the TOC %d", len(got), len(l.entries))
	}
	for i := range got {
		if !reflect.DeepEqual(got[i], l.entries[i]) {
			t.Errorf("entry %d:\nheader %+v\n   TOC %+v", i, got[i], l.entries[i])
		}
	}
}
