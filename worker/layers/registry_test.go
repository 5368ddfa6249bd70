package layers

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/internal/fakeregistry"
	"github.com/starlight-project/starlight/worker/snapshotter"
)

type fakeContents map[digest.Digest]bool

func (f fakeContents) Has(d digest.Digest) bool { return f[d] }

type fakeMount struct{ mounted map[string]bool }

func (f *fakeMount) mount(dir string, tree *api.LayerTree) (io.Closer, error) {
	f.mounted[dir] = true
	return closer(func() error { delete(f.mounted, dir); return nil }), nil
}

type closer func() error

func (c closer) Close() error { return c() }

func TestLayers(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	img := fakeregistry.BuildImage(t, 1<<20,
		[]fakeregistry.File{{Name: "a", Type: api.TypeReg, Mode: 0o644, Data: []byte("a")}, {Name: "e", Type: api.TypeReg, Mode: 0o644}},
		[]fakeregistry.File{{Name: "b", Type: api.TypeReg, Mode: 0o644, Data: []byte("b")}},
	)
	l0, l1 := img.Layers[0], img.Layers[1]
	d0, d1 := digest.Digest(l0.Digest), digest.Digest(l1.Digest)
	contents := fakeContents{}
	fm := &fakeMount{mounted: map[string]bool{}}

	l, err := Open(ctx, root, contents, fm.mount)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := l.Resolve(ctx, map[string]string{snapshotter.LabelInheritedLayerDigest: l0.Digest}); ok {
		t.Fatal("an unknown layer resolved")
	}
	for _, tree := range []*api.LayerTree{&l0, &l1} {
		if err := l.Add(tree); err != nil {
			t.Fatal(err)
		}
	}
	for _, key := range []string{snapshotter.LabelLayerDigest, snapshotter.LabelInheritedLayerDigest, snapshotter.LabelCRILayerDigest} {
		if d, ok := l.Resolve(ctx, map[string]string{key: l1.Digest}); !ok || d != d1 {
			t.Fatalf("Resolve(%s) = %s, %v", key, d, ok)
		}
	}
	if _, ok := l.Resolve(ctx, map[string]string{snapshotter.LabelLayerDigest: "sha256:../../etc"}); ok {
		t.Fatal("an invalid digest resolved")
	}

	dir, err := l.Dir(ctx, d0)
	if err != nil || dir != filepath.Join(root, d0.Encoded(), "mnt") || !fm.mounted[dir] {
		t.Fatalf("Dir = %q, %v (mounted %v)", dir, err, fm.mounted)
	}
	if u, _ := l.Usage(ctx, d0); u.Size != 1 || u.Inodes != 2 {
		t.Fatalf("usage %+v", u)
	}

	// Completeness: a layer is complete when all its contents are in.
	if inv := l.Inventory(); len(inv) != 0 {
		t.Fatalf("inventory %v before any content", inv)
	}
	contents[digest.Digest(l0.Entries[0].Digest)] = true
	if ok, err := l.CheckComplete(&l0); !ok || err != nil {
		t.Fatalf("CheckComplete(l0) = %v, %v", ok, err)
	}
	if ok, _ := l.CheckComplete(&l1); ok {
		t.Fatal("l1 complete without its content")
	}
	if inv := l.Inventory(); !reflect.DeepEqual(inv, []string{l0.Digest}) {
		t.Fatalf("inventory %v", inv)
	}

	l.Release(ctx, d0)
	if fm.mounted[dir] {
		t.Fatal("Release did not unmount")
	}
	l.Dir(ctx, d0)
	if err := l.Close(); err != nil || len(fm.mounted) != 0 {
		t.Fatalf("Close: %v, still mounted %v", err, fm.mounted)
	}

	// Everything survives a restart; MountAll remounts every layer.
	l2, err := Open(ctx, root, contents, fm.mount)
	if err != nil {
		t.Fatal(err)
	}
	if !l2.Known(d0) || !l2.Known(d1) || !reflect.DeepEqual(l2.Inventory(), []string{l0.Digest}) {
		t.Fatalf("after reopen: known %v %v, inventory %v", l2.Known(d0), l2.Known(d1), l2.Inventory())
	}
	l2.MountAll(ctx)
	if len(fm.mounted) != 2 {
		t.Fatalf("MountAll mounted %v", fm.mounted)
	}
	l2.Close()

	// A tree edited on disk to describe another layer is ignored.
	os.WriteFile(filepath.Join(root, d1.Encoded(), "tree.json"), []byte(`{"digest":"`+l0.Digest+`"}`), 0o600)
	l3, err := Open(ctx, root, contents, fm.mount)
	if err != nil || l3.Known(d1) {
		t.Fatalf("tampered tree accepted: %v", err)
	}
}
