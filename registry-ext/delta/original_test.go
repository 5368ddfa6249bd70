package delta

import (
	"context"
	"encoding/json"
	"slices"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/schema"
)

// pushed stores a pushed platform manifest over the given layer digests
// and records that it converted to converted.
// The salt makes manifests over the same layers distinct.
func (f *fixture) pushed(repository string, converted digest.Digest, salt string, layers ...digest.Digest) digest.Digest {
	t := f.t
	t.Helper()
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest}
	m.SchemaVersion = 2
	m.Config = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromString("config " + salt)}
	for _, l := range layers {
		m.Layers = append(m.Layers, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: l})
	}
	mb, _ := json.Marshal(m)
	md := f.blobs.put(t, mb)
	f.complete(repository, md, converted, schema.ImageManifest{Platform: "linux/amd64",
		OriginalDigest: md.String(), ManifestDigest: converted.String(), ConfigDigest: m.Config.Digest.String()})
	return md
}

// TestPlanOriginalDigests checks that the header names, for every
// converted layer, the pushed layer it replaces, and only when that is
// unambiguous.
func TestPlanOriginalDigests(t *testing.T) {
	gz := func(s string) digest.Digest { return digest.FromString("gzip layer " + s) }
	for _, tt := range []struct {
		name   string
		pushes [][]digest.Digest // pushed manifests converting to the image
		want   []string
	}{
		{"already converted", nil, []string{"", ""}},
		{"one push", [][]digest.Digest{{gz("a"), gz("b")}}, []string{gz("a").String(), gz("b").String()}},
		{"two pushes agree", [][]digest.Digest{{gz("a"), gz("b")}, {gz("a"), gz("b")}},
			[]string{gz("a").String(), gz("b").String()}},
		{"two pushes differ in one layer", [][]digest.Digest{{gz("a"), gz("b")}, {gz("a"), gz("c")}},
			[]string{gz("a").String(), ""}},
		{"layer count differs", [][]digest.Digest{{gz("a")}}, []string{"", ""}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			base := f.layer(reg("etc/os-release", []byte("base\n")))
			top := f.layer(reg("app/main", []byte("main\n")))
			m := f.image("app", base, top)
			for i, layers := range tt.pushes {
				f.pushed("app", m, string(rune('a'+i)), layers...)
			}
			h, _, err := f.planner().Plan(context.Background(), "app", m, api.DeltaRequest{})
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, l := range h.Layers {
				got = append(got, l.OriginalDigest)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("original digests %v, want %v", got, tt.want)
			}
		})
	}
}
