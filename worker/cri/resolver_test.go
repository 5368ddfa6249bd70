package cri

import (
	"context"
	"errors"
	"io"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/internal/fakeregistry"
	"github.com/starlight-project/starlight/worker/layers"
	"github.com/starlight-project/starlight/worker/snapshotter"
)

// fetcher records the CRI fetches asked for and, when it succeeds, records
// the image's layers as a real fetch would.
type fetcher struct {
	registry *layers.Registry
	img      *fakeregistry.Image
	err      error
	calls    int
}

func (f *fetcher) FetchCRI(ctx context.Context, imageRef string, manifest digest.Digest) error {
	f.calls++
	if f.err != nil {
		return f.err
	}
	for i := range f.img.Layers {
		if err := f.registry.Add(&f.img.Layers[i]); err != nil {
			return err
		}
	}
	return nil
}

type noContents struct{}

func (noContents) Has(digest.Digest) bool { return false }

func noMount(string, *api.LayerTree) (io.Closer, error) { return io.NopCloser(nil), nil }

func TestResolve(t *testing.T) {
	img, manifest, pushed := fakeregistry.CRIImage(t)
	converted := digest.Digest(img.Layers[1].Digest)
	criLabels := func(layer digest.Digest) map[string]string {
		return map[string]string{
			snapshotter.LabelCRIImageRef:       "127.0.0.1:5000/app:v1",
			snapshotter.LabelCRIManifestDigest: manifest.String(),
			snapshotter.LabelCRILayerDigest:    layer.String(),
		}
	}
	tests := []struct {
		name      string
		labels    map[string]string
		fetchErr  error
		want      digest.Digest
		wantOK    bool
		wantCalls int
	}{
		{"unknown CRI layer fetches the image", criLabels(pushed[1]), nil, converted, true, 1},
		{"fetch fails: containerd unpacks", criLabels(pushed[1]), errors.New("registry unreachable"), "", false, 1},
		{"no manifest label: no fetch", map[string]string{snapshotter.LabelCRILayerDigest: pushed[1].String()}, nil, "", false, 0},
		{"not a CRI prepare: no fetch", map[string]string{snapshotter.LabelLayerDigest: converted.String()}, nil, "", false, 0},
		{"invalid digest: no fetch", criLabels("sha256:../../etc"), nil, "", false, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			reg, err := layers.Open(ctx, t.TempDir(), noContents{}, noMount)
			if err != nil {
				t.Fatal(err)
			}
			f := &fetcher{registry: reg, img: img, err: tt.fetchErr}
			r := NewResolver(reg, f)
			d, ok := r.Resolve(ctx, tt.labels)
			if d != tt.want || ok != tt.wantOK || f.calls != tt.wantCalls {
				t.Fatalf("Resolve = %s, %v after %d fetches; want %s, %v after %d", d, ok, f.calls, tt.want, tt.wantOK, tt.wantCalls)
			}
			if ok {
				// Known now: the next layer's Prepare resolves without
				// asking.
				r.Unpin(ctx, d)
				if _, ok := r.Resolve(ctx, criLabels(pushed[0])); !ok || f.calls != tt.wantCalls {
					t.Fatalf("second layer: resolved %v after %d fetches", ok, f.calls)
				}
			}
		})
	}
}
