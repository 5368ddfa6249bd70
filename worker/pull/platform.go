package pull

import (
	"encoding/json"
	"fmt"

	"github.com/containerd/platforms"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
)

// DefaultPlatform is the platform a pull asks for when its request names
// none: the host's, normalised as containerd does (linux/amd64,
// linux/arm64, linux/arm/v7...).
var DefaultPlatform = normalizePlatform(platforms.DefaultSpec())

// ParsePlatform parses the platform of a pull request as containerd (and
// `ctr pull --platform`) does: "os/arch[/variant]", normalised
// ("linux/aarch64" is linux/arm64, "linux/arm64/v8" too). Empty is
// DefaultPlatform.
func ParsePlatform(s string) (api.Platform, error) {
	if s == "" {
		return DefaultPlatform, nil
	}
	p, err := platforms.Parse(s)
	if err != nil {
		return api.Platform{}, fmt.Errorf("invalid platform: %w (give os/arch[/variant], e.g. linux/arm64)", err)
	}
	if p.OSVersion != "" || len(p.OSFeatures) > 0 {
		return api.Platform{}, fmt.Errorf("invalid platform %q: an OS version cannot be selected (give os/arch[/variant], e.g. linux/arm64)", s)
	}
	return normalizePlatform(p), nil
}

func normalizePlatform(p ocispec.Platform) api.Platform {
	p = platforms.Normalize(p)
	return api.Platform{OS: p.OS, Architecture: p.Architecture, Variant: p.Variant}
}

// configPlatform returns the platform an image config names, normalised;
// false when it names no OS and architecture.
func configPlatform(config []byte) (api.Platform, bool) {
	var p ocispec.Platform // the config's "os", "architecture", "variant"
	if json.Unmarshal(config, &p) != nil || p.OS == "" || p.Architecture == "" {
		return api.Platform{}, false
	}
	return normalizePlatform(p), true
}
