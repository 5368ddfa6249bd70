package config

import (
	"fmt"

	"github.com/spf13/pflag"
)

// Flags are the starlight-worker command line flags. A flag given on the
// command line overrides the same setting of the config file.
type Flags struct {
	fs          *pflag.FlagSet
	file        string
	root        string
	address     string
	api         string
	containerd  string
	criProxy    string
	metrics     string
	logLevel    string
	registries  []string
	demand      int
	hostsDir    string
	dockerCfg   string
	fdStore     string
	fdHolder    string
	materialize bool
}

// AddFlags registers the worker flags on fs.
func AddFlags(fs *pflag.FlagSet) *Flags {
	f := &Flags{fs: fs}
	fs.StringVar(&f.file, "config", "", "TOML config file (see deploy/worker/config.toml.example)")
	fs.StringVar(&f.root, "root", DefaultRoot, "directory that holds all state")
	fs.StringVar(&f.address, "address", DefaultAddress, "unix socket of the snapshotter gRPC service containerd dials")
	fs.StringVar(&f.api, "api", DefaultAPI, "unix socket of the worker API (ctr-starlight --worker)")
	fs.StringVar(&f.containerd, "containerd", DefaultContainerd, "containerd's socket")
	fs.StringVar(&f.criProxy, "cri-proxy", DefaultCRIProxy, "unix socket of the CRI proxy for kubelet's image service endpoint (empty: off)")
	fs.StringVar(&f.metrics, "metrics", "", "listen address for Prometheus metrics, e.g. 127.0.0.1:9100 (empty: off)")
	fs.StringVar(&f.logLevel, "log-level", DefaultLogLevel, "log level: trace, debug, info, warn, error")
	fs.IntVar(&f.demand, "demand-fetches", DefaultDemandFetches, "concurrent ranged GETs for chunks a blocked read waits for (0: wait for the bundle stream)")
	fs.StringVar(&f.hostsDir, "hosts-dir", DefaultConfigPath, "containerd's host configuration directory (hosts.toml), config_path (empty: none)")
	fs.StringVar(&f.dockerCfg, "docker-config", "", "docker config.json for registry credentials (default $DOCKER_CONFIG/config.json or ~/.docker/config.json)")
	fs.StringVar(&f.fdStore, "fd-store", DefaultFDStore, "where the FUSE connections are kept across worker restarts: auto, systemd, holder, off")
	fs.StringVar(&f.fdHolder, "fd-holder", "", "unix socket of the fd-holder (default ROOT/fd-holder.sock)")
	fs.BoolVar(&f.materialize, "materialize", true, "serve complete layers as overlayfs metadata-only directories instead of FUSE (false on containerd 2 nodes)")
	fs.StringArrayVar(&f.registries, "registry", nil, "Starlight registry, repeatable: http://host:port (plain HTTP), https://host, userinfo allowed")
	return f
}

// Load builds the configuration: defaults, then the --config file, then
// the flags given on the command line. --registry entries replace file
// entries of the same host and add the others.
func (f *Flags) Load() (*Config, error) {
	c := Default()
	if f.file != "" {
		var err error
		if c, err = LoadFile(f.file); err != nil {
			return nil, err
		}
	}
	for name, dst := range map[string]*string{
		"root":          &c.Root,
		"address":       &c.Address,
		"api":           &c.API,
		"containerd":    &c.Containerd,
		"cri-proxy":     &c.CRIProxy,
		"metrics":       &c.Metrics,
		"log-level":     &c.LogLevel,
		"hosts-dir":     &c.ConfigPath,
		"docker-config": &c.DockerConfig,
		"fd-store":      &c.FDStore,
		"fd-holder":     &c.FDHolder,
	} {
		if fl := f.fs.Lookup(name); fl != nil && fl.Changed {
			*dst = fl.Value.String()
		}
	}
	if fl := f.fs.Lookup("materialize"); fl != nil && fl.Changed {
		c.Materialize = &f.materialize
	}
	if fl := f.fs.Lookup("demand-fetches"); fl != nil && fl.Changed {
		c.DemandFetches = f.demand
	}
	for _, s := range f.registries {
		r, err := ParseRegistryURL(s)
		if err != nil {
			return nil, fmt.Errorf("--registry: %w", err)
		}
		c.SetRegistry(r)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}
