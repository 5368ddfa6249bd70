package harness

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// config2 is the configuration (version 3) of containerd 2, the
// counterpart of config16: the proxy plugins are appended by
// StartContainerd (their section is the same in both versions). Version 3
// splits the CRI plugin into an image service (snapshotter, registries,
// sandbox image) and a runtime (runc, CNI), and the registry is reached
// through a hosts.toml under config_path instead of the removed mirrors.
func config2(c *Containerd, opts ContainerdOptions) (string, error) {
	dir := c.Dir
	// NRI is on by default in containerd 2 and listens on the machine's
	// one /var/run/nri/nri.sock: off, so that parallel daemons do not
	// fight over it.
	disabled := []string{
		"io.containerd.nri.v1.nri",
		"io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
		"io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.erofs",
		"io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
	}
	if opts.CRIRegistry == "" {
		disabled = append(disabled, "io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images",
			"io.containerd.cri.v1.runtime", "io.containerd.podsandbox.controller.v1.podsandbox")
	}
	quoted := make([]string, len(disabled))
	for i, d := range disabled {
		quoted[i] = fmt.Sprintf("%q", d)
	}
	cfg := fmt.Sprintf(`version = 3
root = %q
state = %q
disabled_plugins = [%s]

[grpc]
  address = %q

[ttrpc]
  address = %q

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = %q
`, c.Root, c.State, strings.Join(quoted, ", "), c.Address, c.Address+".ttrpc", filepath.Join(dir, "opt"))
	if opts.CRIRegistry == "" {
		return cfg, nil
	}
	certs := filepath.Join(dir, "certs.d")
	if err := writeHostsTOML(certs, opts.CRIRegistry); err != nil {
		return "", err
	}
	cfg += fmt.Sprintf(`
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "starlight"
  # CRI's snapshot annotations on every layer's Prepare: the worker finds
  # the image by them. containerd falls back, with a warning, to the
  # local pull (not the transfer service, 2.1's default) when they are
  # on: say so.
  disable_snapshot_annotations = false
  use_local_image_pull = true

[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "%s/starlight-test/pause:none"

[plugins."io.containerd.cri.v1.images".registry]
  config_path = %q

[plugins."io.containerd.cri.v1.runtime"]
  # Pod sandboxes get oom_score_adj -998, which this kind of machine (a VM
  # without CAP_SYS_RESOURCE over lowering it) refuses: keep it at
  # containerd's own.
  restrict_oom_score_adj = true

[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = [%q]
  conf_dir = %q

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
`, opts.CRIRegistry, certs, filepath.Join(dir, "cni-bin"), filepath.Join(dir, "cni-conf"))
	return cfg, nil
}

// writeHostsTOML writes certs/HOST:PORT/hosts.toml, which sends the pulls
// of registry (host:port) to it over plain HTTP.
func writeHostsTOML(certs, registry string) error {
	hostDir := filepath.Join(certs, registry)
	if err := os.MkdirAll(hostDir, 0o755); err != nil {
		return fmt.Errorf("registry hosts dir: %w", err)
	}
	hosts := fmt.Sprintf(`server = "http://%s"

[host."http://%s"]
  capabilities = ["pull", "resolve"]
`, registry, registry)
	if err := os.WriteFile(filepath.Join(hostDir, "hosts.toml"), []byte(hosts), 0o644); err != nil {
		return fmt.Errorf("registry hosts.toml: %w", err)
	}
	return nil
}
