package harness

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/opencontainers/image-spec/identity"
)

// Paths of the system containerd tools (Debian's containerd package).
const (
	ContainerdBinary = "/usr/bin/containerd"
	CtrBinary        = "/usr/bin/ctr"
)

// ContainerdVersion is the containerd a test runs against.
type ContainerdVersion int

const (
	// ContainerdDefault is Containerd16, or Containerd2 when
	// $STARLIGHT_CONTAINERD is 2: the whole end-to-end suite runs against
	// containerd 2 with `STARLIGHT_CONTAINERD=2 make test`.
	ContainerdDefault ContainerdVersion = iota
	// Containerd16 is Debian's containerd 1.6 (ContainerdBinary), with a
	// configuration of version 2.
	Containerd16
	// Containerd2 is containerd 2 built from the module
	// integration/containerd2 (see Containerd2Binaries), with a
	// configuration of version 3, its own shim and its own ctr.
	Containerd2
)

// ContainerdVersions are the versions the end-to-end tests that matter
// most run against, in the order they run.
var ContainerdVersions = []ContainerdVersion{Containerd16, Containerd2}

func (v ContainerdVersion) String() string {
	switch v {
	case ContainerdDefault:
		return "containerd-default"
	case Containerd16:
		return "containerd1.6"
	case Containerd2:
		return "containerd2"
	}
	return fmt.Sprintf("containerd-version-%d", int(v))
}

// ContainerdOptions configure StartContainerd.
type ContainerdOptions struct {
	// StarlightSocket, when set, registers the starlight snapshotter as
	// `[proxy_plugins.starlight]` at this address. The worker may start
	// later: containerd dials proxy plugins lazily.
	StarlightSocket string
	// ProxySnapshotters registers more proxy snapshotters, by name, at
	// these addresses (e.g. "stargz": stargz-snapshotter's socket).
	ProxySnapshotters map[string]string
	// Namespace used by Ctr; "starlight-test" when empty.
	Namespace string
	// CRIRegistry, when set, turns the CRI plugin on: it pulls into the
	// starlight snapshotter with CRI's snapshot annotations, and reaches
	// this registry (host:port) over plain HTTP. Its sandbox image is
	// CRIRegistry/starlight-test/pause:none. There is no CNI: pod
	// sandboxes use the host network.
	CRIRegistry string
	// Version is the containerd to start; ContainerdDefault when zero.
	Version ContainerdVersion
}

// Containerd is a private containerd daemon.
type Containerd struct {
	Address   string // the gRPC socket
	Root      string
	State     string
	Dir       string
	Namespace string
	// Version is the containerd this is (never ContainerdDefault).
	Version ContainerdVersion
	// ctr is its ctr binary, env what its daemon and ctr get added to
	// their environment.
	ctr string
	env []string
	// starlightSocket is where its starlight proxy snapshotter is.
	starlightSocket string
	proc            *Process
}

// StartContainerd starts containerd (/usr/bin/containerd, or containerd 2
// when opts.Version says so) with its own root, state and socket under a
// short temporary directory, the CRI plugin off unless opts.CRIRegistry
// is set. Cleanup
// removes the tasks left running, stops it by PID and unmounts whatever is
// still mounted under its directories.
func StartContainerd(t T, opts ContainerdOptions) *Containerd {
	t.Helper()
	dir := ShortTempDir(t, "ctd-")
	c := &Containerd{
		Dir:       dir,
		Address:   filepath.Join(dir, "c.sock"),
		Root:      filepath.Join(dir, "root"),
		State:     filepath.Join(dir, "state"),
		Namespace: opts.Namespace,
		Version:   opts.Version,

		ctr:             CtrBinary,
		starlightSocket: opts.StarlightSocket,
	}
	if c.Namespace == "" {
		c.Namespace = "starlight-test"
	}
	if c.Version == ContainerdDefault {
		switch v := os.Getenv("STARLIGHT_CONTAINERD"); v {
		case "", "1.6":
			c.Version = Containerd16
		case "2":
			c.Version = Containerd2
		default:
			t.Fatalf("STARLIGHT_CONTAINERD=%q: want 1.6 or 2", v)
		}
	}
	bin := ContainerdBinary
	var cfg string
	switch c.Version {
	case Containerd16:
		cfg = config16(c, opts)
	case Containerd2:
		tools := Containerd2Binaries(t)
		bin, c.ctr = filepath.Join(tools, Containerd2Binary), filepath.Join(tools, Ctr2Binary)
		// Its own shim first on PATH, where containerd looks shims up
		// (Debian's 1.6 shim is in /usr/bin). Deprecation warnings off:
		// ctr 2 prints the daemon's (cgroup v1 on this machine) with
		// every command, in output the tests compare with 1.6's.
		c.env = []string{"PATH=" + tools + string(os.PathListSeparator) + os.Getenv("PATH"),
			"CONTAINERD_SUPPRESS_DEPRECATION_WARNINGS=1"}
		var err error
		if cfg, err = config2(c, opts); err != nil {
			t.Fatalf("containerd 2 config: %v", err)
		}
	default:
		t.Fatalf("containerd: no version %d", int(c.Version))
	}
	if opts.StarlightSocket != "" {
		cfg += fmt.Sprintf(`
[proxy_plugins.starlight]
  type = "snapshot"
  address = %q
`, opts.StarlightSocket)
	}
	names := make([]string, 0, len(opts.ProxySnapshotters))
	for name := range opts.ProxySnapshotters {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		cfg += fmt.Sprintf(`
[proxy_plugins.%q]
  type = "snapshot"
  address = %q
`, name, opts.ProxySnapshotters[name])
	}
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatalf("containerd config: %v", err)
	}
	p, err := startProcess("containerd", filepath.Join(dir, "containerd.log"), c.env, bin, "--config", cfgPath)
	if err != nil {
		t.Fatalf("containerd: %v", err)
	}
	c.proc = p
	t.Cleanup(func() {
		c.removeTasks(t)
		p.Stop(10 * time.Second)
		p.dumpOnFailure(t)
		for _, d := range []string{c.State, c.Root} {
			if err := UnmountUnder(d); err != nil {
				t.Logf("containerd cleanup: %v", err)
			}
		}
	})
	if err := waitFor(p, 60*time.Second, func() error {
		_, err := c.CtrE("version")
		return err
	}); err != nil {
		t.Fatalf("start containerd: %v\n%s", err, p.Log(32<<10))
	}
	t.Logf("%s pid %d on %s", c.Version, p.PID(), c.Address)
	return c
}

// config16 is the configuration (version 2) of containerd 1.6: the
// proxy plugins are appended by StartContainerd.
func config16(c *Containerd, opts ContainerdOptions) string {
	dir := c.Dir
	disabled := `"io.containerd.grpc.v1.cri", `
	if opts.CRIRegistry != "" {
		disabled = ""
	}
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = [%s"io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

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
`, c.Root, c.State, disabled, c.Address, c.Address+".ttrpc", filepath.Join(dir, "opt"))
	if opts.CRIRegistry != "" {
		cfg += fmt.Sprintf(`
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  # Pod sandboxes get oom_score_adj -998, which this kind of machine (a VM
  # without CAP_SYS_RESOURCE over lowering it) refuses: keep it at
  # containerd's own.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  sandbox_image = "%s/starlight-test/pause:none"

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "starlight"
  disable_snapshot_annotations = false

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = %q
  conf_dir = %q

[plugins."io.containerd.grpc.v1.cri".registry.mirrors.%q]
  endpoint = ["http://%s"]
`, opts.CRIRegistry, filepath.Join(dir, "cni-bin"), filepath.Join(dir, "cni-conf"), opts.CRIRegistry, opts.CRIRegistry)
	}
	return cfg
}

// Log returns the tail of the containerd log.
func (c *Containerd) Log() string { return c.proc.Log(64 << 10) }

// CtrE runs `ctr --address ADDR -n NS args...` and returns its combined
// output.
func (c *Containerd) CtrE(args ...string) (string, error) {
	return c.CtrNSE(c.Namespace, args...)
}

// CtrNSE is CtrE in namespace ns.
func (c *Containerd) CtrNSE(ns string, args ...string) (string, error) {
	return c.ToolE(c.ctr, ns, args...)
}

// ToolE runs a ctr-like client (ctr, ctr-remote) against this containerd:
// `bin --address ADDR -n NS args...`, and returns its combined output.
func (c *Containerd) ToolE(bin, ns string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	full := append([]string{"--address", c.Address, "-n", ns}, args...)
	cmd := exec.CommandContext(ctx, bin, full...)
	cmd.Env = append(os.Environ(), c.env...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s %s: %w\n%s", filepath.Base(bin), strings.Join(args, " "), err, out.String())
	}
	return out.String(), nil
}

// Ctr is CtrE that fails the test on error.
func (c *Containerd) Ctr(t T, args ...string) string {
	t.Helper()
	out, err := c.CtrE(args...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return out
}

// CtrNS is Ctr in namespace ns.
func (c *Containerd) CtrNS(t T, ns string, args ...string) string {
	t.Helper()
	out, err := c.CtrNSE(ns, args...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return out
}

// MountImage mounts the rootfs of image ref, already pulled into
// snapshotter in namespace ns, read-only at a new directory, and unmounts
// it in cleanup. It asks the snapshotter for a view of the image's top
// snapshot (its chain ID) and mounts what it returns, as a container
// runtime would; unlike `ctr images mount` it never unpacks layers itself,
// so it shows exactly what the snapshotter serves.
func (c *Containerd) MountImage(t T, ns, snapshotter, ref string) string {
	t.Helper()
	target, err := os.MkdirTemp(c.Dir, "mnt-")
	if err != nil {
		t.Fatalf("mount dir: %v", err)
	}
	client, err := containerd.New(c.Address, containerd.WithDefaultNamespace(ns))
	if err != nil {
		t.Fatalf("containerd client: %v", err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ns), 5*time.Minute)
	defer cancel()
	img, err := client.GetImage(ctx, ref)
	if err != nil {
		t.Fatalf("image %s: %v", ref, err)
	}
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		t.Fatalf("rootfs of %s: %v", ref, err)
	}
	sn := client.SnapshotService(snapshotter)
	key := "harness-view-" + filepath.Base(target)
	// A GC root, or containerd's garbage collector may remove the view
	// while it is mounted.
	mounts, err := sn.View(ctx, key, identity.ChainID(diffIDs).String(),
		snapshots.WithLabels(map[string]string{"containerd.io/gc.root": time.Now().UTC().Format(time.RFC3339)}))
	if err != nil {
		t.Fatalf("view of %s in %s: %v", ref, snapshotter, err)
	}
	t.Cleanup(func() {
		if err := UnmountUnder(target); err != nil {
			t.Logf("unmount %s: %v", target, err)
		}
		client, err := containerd.New(c.Address, containerd.WithDefaultNamespace(ns))
		if err != nil {
			return
		}
		defer client.Close()
		ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ns), time.Minute)
		defer cancel()
		if err := client.SnapshotService(snapshotter).Remove(ctx, key); err != nil {
			t.Logf("remove view %s: %v", key, err)
		}
	})
	if err := mount.All(mounts, target); err != nil {
		t.Fatalf("mount %s view of %s: %v (mounts %+v)", snapshotter, ref, err, mounts)
	}
	return target
}

// removeTasks kills and deletes the tasks and containers left in every
// namespace, so that no shim outlives the daemon.
func (c *Containerd) removeTasks(t T) {
	nsOut, err := c.CtrE("namespaces", "ls", "-q")
	if err != nil {
		return
	}
	for _, ns := range strings.Fields(nsOut) {
		tasks, _ := c.CtrNSE(ns, "tasks", "ls", "-q")
		for _, id := range strings.Fields(tasks) {
			if out, err := c.CtrNSE(ns, "tasks", "delete", "-f", id); err != nil {
				t.Logf("containerd cleanup: %v: %s", err, out)
			}
		}
		ctrs, _ := c.CtrNSE(ns, "containers", "ls", "-q")
		for _, id := range strings.Fields(ctrs) {
			_, _ = c.CtrNSE(ns, "containers", "rm", id)
		}
	}
}
