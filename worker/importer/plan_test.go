package importer

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/internal/fakeregistry"
)

func TestPlanImage(t *testing.T) {
	img := fakeregistry.BuildImage(t, 1<<20,
		[]fakeregistry.File{{Name: "a", Type: api.TypeReg, Mode: 0o644, Data: []byte("a")}},
		[]fakeregistry.File{{Name: "b", Type: api.TypeReg, Mode: 0o644, Data: []byte("b")}},
	)
	var cfg ocispec.Image
	json.Unmarshal(img.Config, &cfg)

	p, err := PlanImage(img.Header(nil))
	if err != nil {
		t.Fatal(err)
	}
	if want := identity.ChainIDs(cfg.RootFS.DiffIDs); len(p.chainIDs) != 2 || p.chainIDs[1] != want[1] {
		t.Fatalf("chain IDs %v, want %v", p.chainIDs, want)
	}
	if p.manifest.Digest != img.ManifestDigest || p.manifest.MediaType != ocispec.MediaTypeImageManifest {
		t.Fatalf("manifest descriptor %+v", p.manifest)
	}

	tests := []struct {
		name    string
		mutate  func(h *api.BundleHeader)
		wantErr string
	}{
		{"manifest bytes differ", func(h *api.BundleHeader) { h.Manifest = append(h.Manifest, ' ') }, "manifest content has digest"},
		{"config bytes differ", func(h *api.BundleHeader) { h.Config = append(h.Config, ' ') }, "config content has digest"},
		{"config digest differs", func(h *api.BundleHeader) { h.ConfigDigest = digest.FromString("x").String() }, "manifest names config"},
		{"layer missing", func(h *api.BundleHeader) { h.Layers = h.Layers[:1] }, "2 layers in the manifest, 2 diff IDs in the config, 1 layer trees"},
		{"layers swapped", func(h *api.BundleHeader) { h.Layers[0], h.Layers[1] = h.Layers[1], h.Layers[0] }, "layer 0 is"},
		{"diff ID differs", func(h *api.BundleHeader) { h.Layers[1].DiffID = digest.FromString("y").String() }, "has diff ID"},
		{"media type", func(h *api.BundleHeader) { h.ManifestMediaType = ocispec.MediaTypeImageIndex }, "unsupported manifest media type"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := img.Header(nil)
			h.Layers = append([]api.LayerTree(nil), h.Layers...)
			tt.mutate(h)
			_, err := PlanImage(h)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}
