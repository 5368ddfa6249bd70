package pull

import (
	"fmt"
	"strings"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/config"
)

// Ref is a parsed image reference.
type Ref struct {
	// Name is the reference exactly as the user gave it; the image record
	// in containerd gets this name, so `ctr run` finds it by the same
	// string.
	Name string
	// Host is the registry host ("127.0.0.1:5000").
	Host string
	// Repository is the path inside the registry ("library/app").
	Repository string
	Tag        string
	Digest     digest.Digest
	// Normalized is the fully qualified form ("docker.io/library/x:latest")
	// that containerd's resolver expects.
	Normalized string
}

// ParseRef parses "host/repo[:tag][@digest]". Without a host the
// reference is on docker.io, as with every OCI tool; without a tag or
// digest the tag is "latest".
func ParseRef(s string) (Ref, error) {
	if s == "" {
		return Ref{}, fmt.Errorf("empty image reference")
	}
	named, err := reference.ParseNormalizedNamed(s)
	if err != nil {
		return Ref{}, fmt.Errorf("invalid image reference %q: %w", s, err)
	}
	r := Ref{Name: s, Host: reference.Domain(named), Repository: reference.Path(named),
		Normalized: reference.TagNameOnly(named).String()}
	if d, ok := named.(reference.Digested); ok {
		if _, err := api.ParseDigest(d.Digest().String()); err != nil {
			return Ref{}, fmt.Errorf("invalid image reference %q: %w", s, err)
		}
		r.Digest = d.Digest()
	}
	if t, ok := named.(reference.Tagged); ok {
		r.Tag = t.Tag()
	}
	if r.Tag == "" && r.Digest == "" {
		r.Tag = "latest"
	}
	return r, nil
}

// DeltaReference is the reference a delta request names: the repository
// and tag or digest, without the host. A digest wins over a tag.
func (r Ref) DeltaReference() string {
	if r.Digest != "" {
		return r.Repository + "@" + r.Digest.String()
	}
	return r.Repository + ":" + r.Tag
}

// Endpoint is where a pull goes.
type Endpoint struct {
	Registry config.Registry
	// Starlight is false when the host is not a configured Starlight
	// registry and the configuration allows a standard containerd pull.
	Starlight bool
}

// ResolveEndpoint maps a reference to the registry configuration of its
// host. plainHTTP (from the pull request) forces HTTP for this pull.
func ResolveEndpoint(cfg *config.Config, r Ref, plainHTTP bool) (Endpoint, error) {
	reg, ok := cfg.Registry(r.Host)
	if !ok {
		if !cfg.AllowPlainFallback {
			configured := "none is configured"
			if hosts := cfg.Hosts(); len(hosts) > 0 {
				configured = "configured: " + strings.Join(hosts, ", ")
			}
			return Endpoint{}, fmt.Errorf("%s: host %s is not a configured Starlight registry (%s); add it with --registry or a [[registry]] entry in the worker config, or set allow_plain_fallback = true for a standard pull",
				r.Name, r.Host, configured)
		}
		reg = config.Registry{Host: r.Host}
	}
	if plainHTTP {
		reg.PlainHTTP = true
	}
	return Endpoint{Registry: reg, Starlight: ok}, nil
}
