package layers

import (
	"context"
	"testing"

	"github.com/opencontainers/go-digest"
	"github.com/starlight-project/starlight/worker/internal/fakeregistry"
	"github.com/starlight-project/starlight/worker/snapshotter"
)

// TestLayersOriginals checks the pushed → converted layer mapping: it is
// recorded from the tree, survives a restart, pins what it resolves, and
// goes with the layer.
func TestLayersOriginals(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	img, _, pushedLayers := fakeregistry.CRIImage(t)
	fm := &fakeMount{mounted: map[string]bool{}}
	l, err := Open(ctx, root, fakeContents{}, fm.mount)
	if err != nil {
		t.Fatal(err)
	}
	for i := range img.Layers {
		if err := l.Add(&img.Layers[i]); err != nil {
			t.Fatal(err)
		}
	}
	l, err = Open(ctx, root, fakeContents{}, fm.mount) // a restart
	if err != nil {
		t.Fatal(err)
	}
	conv := digest.Digest(img.Layers[1].Digest)
	for _, tc := range []struct {
		label string
		value digest.Digest
		want  digest.Digest
		ok    bool
	}{
		{snapshotter.LabelCRILayerDigest, pushedLayers[1], conv, true},
		{snapshotter.LabelCRILayerDigest, conv, conv, true}, // an image pushed as eStargz
		{snapshotter.LabelCRILayerDigest, digest.FromString("unknown"), "", false},
		// Only CRI labels name pushed layers.
		{snapshotter.LabelInheritedLayerDigest, pushedLayers[1], "", false},
	} {
		d, ok := l.Resolve(ctx, map[string]string{tc.label: tc.value.String()})
		if d != tc.want || ok != tc.ok {
			t.Errorf("Resolve(%s=%s) = %s, %v; want %s, %v", tc.label, tc.value, d, ok, tc.want, tc.ok)
		}
		if ok {
			l.Unpin(ctx, d)
		}
	}

	// A resolved layer is not collected before its snapshot exists, nor
	// when it was resolved after the collection started.
	epoch := l.Epoch()
	d, _ := l.Resolve(ctx, map[string]string{snapshotter.LabelCRILayerDigest: pushedLayers[1].String()})
	if removed, err := l.RemoveIdle(ctx, d, epoch); removed || err != nil {
		t.Fatalf("pinned layer removed: %v %v", removed, err)
	}
	l.Unpin(ctx, d)
	if removed, _ := l.RemoveIdle(ctx, d, epoch); removed {
		t.Fatal("layer resolved during the collection removed")
	}
	if removed, err := l.RemoveIdle(ctx, d, l.Epoch()); !removed || err != nil {
		t.Fatalf("idle layer not removed: %v %v", removed, err)
	}
	if _, ok := l.Original(pushedLayers[1]); ok {
		t.Error("the mapping of a removed layer remains")
	}
	if _, ok := l.Resolve(ctx, map[string]string{snapshotter.LabelCRILayerDigest: pushedLayers[0].String()}); !ok {
		t.Error("the other layer's mapping went too")
	}
}
