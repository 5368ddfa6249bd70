// Package config holds the configuration of starlight-worker: a TOML file
// (documented in deploy/worker/config.toml.example) overridden by command
// line flags.
package config

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/BurntSushi/toml"
)

// Defaults. State lives under /var/lib/starlight, sockets under
// /run/starlight.
const (
	DefaultRoot               = "/var/lib/starlight"
	DefaultAddress            = "/run/starlight/starlight-snapshotter.sock"
	DefaultAPI                = "/run/starlight/api.sock"
	DefaultCRIProxy           = "/run/starlight/cri.sock"
	DefaultContainerd         = "/run/containerd/containerd.sock"
	DefaultLogLevel           = "info"
	DefaultMaxConcurrentPulls = 4
	DefaultPullRetries        = 5
	DefaultDemandFetches      = 8
	DefaultFDStore            = "auto"
	// DefaultConfigPath is containerd's host configuration directory,
	// the one its CRI plugin reads too.
	DefaultConfigPath = "/etc/containerd/certs.d"
)

// Config is the worker configuration.
type Config struct {
	// Root holds all state: the content store, layer trees, snapshots.
	Root string `toml:"root"`
	// Address is the unix socket of the snapshotter gRPC service that
	// containerd dials ([proxy_plugins.starlight]).
	Address string `toml:"address"`
	// API is the unix socket of the worker API used by ctr-starlight.
	API string `toml:"api"`
	// Containerd is containerd's socket.
	Containerd string `toml:"containerd"`
	// CRIProxy is the unix socket of the worker's CRI proxy: kubelet's
	// imageServiceEndpoint (or crictl --image-endpoint) points at it
	// instead of containerd. It forwards every call to containerd's CRI
	// service on Containerd, and lends the registry credentials of each
	// PullImage (a pod's imagePullSecrets) to the worker's fetch of that
	// image. Empty turns it off.
	CRIProxy string `toml:"cri_proxy"`
	// Metrics is an optional TCP listen address for Prometheus metrics
	// (served at /metrics). Empty disables them.
	Metrics string `toml:"metrics"`
	// LogLevel is one of trace, debug, info, warn, error.
	LogLevel string `toml:"log_level"`
	// AllowPlainFallback makes a reference on a host that is not a
	// configured Starlight registry fall back to a standard containerd
	// pull instead of failing.
	AllowPlainFallback bool `toml:"allow_plain_fallback"`
	// MaxConcurrentPulls bounds the pulls that stream at the same time.
	MaxConcurrentPulls int `toml:"max_concurrent_pulls"`
	// PullRetries bounds how often in a row a broken bundle stream is
	// resumed without receiving a frame before its pending contents
	// fail; a stream that brought frames before it broke is resumed at
	// once and starts the count again. 0 never resumes.
	PullRetries int `toml:"pull_retries"`
	// DemandFetches bounds the ranged blob GETs that fetch, ahead of
	// the bundle stream, the chunks a blocked read waits for. 0 turns
	// on-demand fetching off: reads wait for the stream.
	DemandFetches int `toml:"demand_fetches"`
	// ConfigPath is containerd's host configuration directory
	// (hosts.toml: mirrors, CAs, client certificates, skip_verify,
	// headers, plain HTTP servers) for every registry request of the
	// worker. Empty, or a host without a directory there: the host
	// itself over HTTPS (HTTP with its registry's plain_http).
	ConfigPath string `toml:"config_path"`
	// DockerConfig is the docker config.json whose credentials (auths,
	// credHelpers, credsStore) apply to hosts that have none in a
	// [[registry]] entry. Empty: $DOCKER_CONFIG/config.json, else
	// ~/.docker/config.json.
	DockerConfig string `toml:"docker_config"`
	// FDStore is where the worker keeps the FUSE connections of its
	// layer views, so that running containers survive a restart, a
	// crash or an upgrade of the worker: "systemd" (the unit's file
	// descriptor store, FileDescriptorStoreMax=), "holder" (the
	// fd-holder process the worker starts), "auto" (systemd's store
	// when systemd says the unit has one, else the holder) or "off"
	// (the views end with the worker, and so do the containers' root
	// file systems).
	FDStore string `toml:"fd_store"`
	// FDHolder is the fd-holder's unix socket. Empty: fd-holder.sock
	// under Root.
	FDHolder string `toml:"fd_holder"`
	// Materialize turns complete layers into plain directories of
	// overlayfs metadata-only files over the store (no FUSE on a new
	// container's path) where the kernel can stack data-only layers.
	// Default true. containerd 2 cannot mount them yet (its client-side
	// temporary mounts fail on the "::" of data-only layers): set false
	// on containerd 2 nodes.
	Materialize *bool `toml:"materialize"`
	// Registries are the Starlight registries references may point at.
	Registries []Registry `toml:"registry"`
}

// MaterializeLayers tells whether complete layers are materialised
// (Materialize, default true).
func (c *Config) MaterializeLayers() bool { return c.Materialize == nil || *c.Materialize }

// FDHolderSocket is the fd-holder's socket: FDHolder, or its default
// under Root.
func (c *Config) FDHolderSocket() string {
	if c.FDHolder != "" {
		return c.FDHolder
	}
	return filepath.Join(c.Root, "fd-holder.sock")
}

// Registry is one Starlight registry endpoint.
type Registry struct {
	// Host is the registry host as it appears in image references
	// ("registry.example.com", "127.0.0.1:5000").
	Host string `toml:"host"`
	// PlainHTTP talks HTTP instead of HTTPS to this host.
	PlainHTTP bool `toml:"plain_http"`
	// Username and Password authenticate to the registry (HTTP Basic, or
	// to the token service of a Bearer challenge).
	Username string `toml:"username"`
	Password string `toml:"password"`
	// PasswordFile is read instead of Password when set, so the secret
	// need not sit in the config file. Surrounding whitespace is trimmed.
	PasswordFile string `toml:"password_file"`
}

// String describes the registry without its secret.
func (r Registry) String() string {
	scheme := "https"
	if r.PlainHTTP {
		scheme = "http"
	}
	if r.Username != "" {
		return scheme + "://" + r.Username + "@" + r.Host
	}
	return scheme + "://" + r.Host
}

// BaseURL is the URL of the registry root, without a trailing slash.
func (r Registry) BaseURL() string {
	if r.PlainHTTP {
		return "http://" + r.Host
	}
	return "https://" + r.Host
}

// Default returns the configuration used when neither a file nor flags
// set a value.
func Default() *Config {
	return &Config{
		Root:               DefaultRoot,
		Address:            DefaultAddress,
		API:                DefaultAPI,
		Containerd:         DefaultContainerd,
		CRIProxy:           DefaultCRIProxy,
		LogLevel:           DefaultLogLevel,
		MaxConcurrentPulls: DefaultMaxConcurrentPulls,
		PullRetries:        DefaultPullRetries,
		DemandFetches:      DefaultDemandFetches,
		FDStore:            DefaultFDStore,
		ConfigPath:         DefaultConfigPath,
	}
}

// LoadFile decodes the TOML file at path on top of the defaults. Unknown
// keys are an error so that a typo does not silently fall back to a
// default.
func LoadFile(path string) (*Config, error) {
	c := Default()
	md, err := toml.DecodeFile(path, c)
	if err != nil {
		return nil, fmt.Errorf("reading config %s: %w", path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return nil, fmt.Errorf("reading config %s: unknown keys: %s", path, strings.Join(keys, ", "))
	}
	return c, nil
}

// ParseRegistryURL parses a --registry value: "http://host:port" means
// plain HTTP, "https://host" or a bare "host[:port]" means HTTPS, and
// userinfo ("http://user:pass@host") sets the credentials.
func ParseRegistryURL(s string) (Registry, error) {
	raw := s
	if !strings.Contains(s, "://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		// url.Error repeats the raw value, which may hold a password.
		return Registry{}, fmt.Errorf("invalid registry URL: %w", errors.Unwrap(err))
	}
	var r Registry
	switch u.Scheme {
	case "http":
		r.PlainHTTP = true
	case "https":
	default:
		return Registry{}, fmt.Errorf("invalid registry URL %q: scheme must be http or https", redact(raw))
	}
	if u.Host == "" {
		return Registry{}, fmt.Errorf("invalid registry URL %q: no host", redact(raw))
	}
	if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return Registry{}, fmt.Errorf("invalid registry URL %q: a registry is a host, not a path", redact(raw))
	}
	r.Host = u.Host
	if u.User != nil {
		r.Username = u.User.Username()
		r.Password, _ = u.User.Password()
	}
	return r, nil
}

func redact(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.User == nil {
		return s
	}
	return u.Redacted()
}

// Validate checks the configuration and resolves password files.
func (c *Config) Validate() error {
	for name, v := range map[string]string{"root": c.Root, "address": c.Address, "api": c.API, "containerd": c.Containerd} {
		if v == "" {
			return fmt.Errorf("config: %s must not be empty", name)
		}
	}
	switch strings.ToLower(c.LogLevel) {
	case "trace", "debug", "info", "warn", "warning", "error", "fatal", "panic":
	default:
		return fmt.Errorf("config: unknown log level %q", c.LogLevel)
	}
	if c.MaxConcurrentPulls <= 0 {
		return fmt.Errorf("config: max_concurrent_pulls must be positive")
	}
	if c.PullRetries < 0 {
		return fmt.Errorf("config: pull_retries must not be negative")
	}
	if c.DemandFetches < 0 {
		return fmt.Errorf("config: demand_fetches must not be negative")
	}
	switch c.FDStore {
	case "auto", "systemd", "holder", "off":
	default:
		return fmt.Errorf("config: fd_store must be auto, systemd, holder or off, not %q", c.FDStore)
	}
	seen := map[string]bool{}
	for i := range c.Registries {
		r := &c.Registries[i]
		if r.Host == "" || strings.ContainsAny(r.Host, "/ ") {
			return fmt.Errorf("config: registry %d: invalid host %q", i, r.Host)
		}
		if seen[r.Host] {
			return fmt.Errorf("config: registry %s is configured twice", r.Host)
		}
		seen[r.Host] = true
		if r.PasswordFile != "" {
			b, err := os.ReadFile(r.PasswordFile)
			if err != nil {
				return fmt.Errorf("config: registry %s: password_file: %w", r.Host, err)
			}
			r.Password = strings.TrimSpace(string(b))
		}
	}
	return nil
}

// Registry returns the configured registry for host.
func (c *Config) Registry(host string) (Registry, bool) {
	for _, r := range c.Registries {
		if r.Host == host {
			return r, true
		}
	}
	return Registry{}, false
}

// Hosts lists the configured registry hosts.
func (c *Config) Hosts() []string {
	hosts := make([]string, len(c.Registries))
	for i, r := range c.Registries {
		hosts[i] = r.Host
	}
	return hosts
}

// SetRegistry adds r, replacing a registry with the same host.
func (c *Config) SetRegistry(r Registry) {
	for i := range c.Registries {
		if c.Registries[i].Host == r.Host {
			c.Registries[i] = r
			return
		}
	}
	c.Registries = append(c.Registries, r)
}
