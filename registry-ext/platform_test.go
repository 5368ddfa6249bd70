package registryext

import (
	"testing"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/schema"
)

func TestPickPlatform(t *testing.T) {
	index := func(ps ...string) []schema.ImageManifest {
		ms := make([]schema.ImageManifest, len(ps))
		for i, p := range ps {
			ms[i] = schema.ImageManifest{Platform: p, ManifestDigest: p}
		}
		return ms
	}
	for _, tc := range []struct {
		index []schema.ImageManifest
		want  api.Platform
		pick  string // "" for none
	}{
		{index("linux/amd64", "linux/arm64"), api.Platform{OS: "linux", Architecture: "amd64"}, "linux/amd64"},
		{index("linux/amd64", "linux/arm64"), api.Platform{OS: "linux", Architecture: "arm64"}, "linux/arm64"},
		// arm64/v8 is arm64, both ways.
		{index("linux/amd64", "linux/arm64/v8"), api.Platform{OS: "linux", Architecture: "arm64"}, "linux/arm64/v8"},
		{index("linux/amd64", "linux/arm64"), api.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}, "linux/arm64"},
		// Names are normalised.
		{index("linux/x86_64", "linux/aarch64"), api.Platform{OS: "linux", Architecture: "arm64"}, "linux/aarch64"},
		{index("Linux/amd64"), api.Platform{OS: "linux", Architecture: "amd64"}, "Linux/amd64"},
		// The exact platform is better than a compatible one.
		{index("linux/arm/v6", "linux/arm/v7"), api.Platform{OS: "linux", Architecture: "arm", Variant: "v7"}, "linux/arm/v7"},
		{index("linux/arm/v6", "linux/arm64"), api.Platform{OS: "linux", Architecture: "arm", Variant: "v7"}, "linux/arm/v6"},
		{index("linux/386", "linux/amd64"), api.Platform{OS: "linux", Architecture: "amd64"}, "linux/amd64"},
		{index("linux/386", "linux/arm64"), api.Platform{OS: "linux", Architecture: "amd64"}, "linux/386"},
		// arm means arm/v7.
		{index("linux/arm/v7", "linux/arm64"), api.Platform{OS: "linux", Architecture: "arm"}, "linux/arm/v7"},
		// No variant asked: the only manifest of the architecture.
		{index("linux/amd64/v3", "linux/arm64"), api.Platform{OS: "linux", Architecture: "amd64"}, "linux/amd64/v3"},
		{index("linux/amd64/v2", "linux/amd64/v3"), api.Platform{OS: "linux", Architecture: "amd64"}, ""},
		// A newer CPU runs older variants, not the other way round.
		{index("linux/amd64/v2"), api.Platform{OS: "linux", Architecture: "amd64", Variant: "v3"}, "linux/amd64/v2"},
		{index("linux/amd64/v3"), api.Platform{OS: "linux", Architecture: "amd64", Variant: "v2"}, ""},
		{index("linux/amd64", "linux/arm64"), api.Platform{OS: "linux", Architecture: "s390x"}, ""},
		{index("linux/amd64"), api.Platform{OS: "windows", Architecture: "amd64"}, ""},
	} {
		m, ok := pickPlatform(tc.index, tc.want)
		if got := m.ManifestDigest; ok != (tc.pick != "") || got != tc.pick {
			t.Errorf("%v from %v: got %q (%t), want %q", tc.want, tc.index, got, ok, tc.pick)
		}
	}
}
