package harness

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Names of stargz-snapshotter's binaries (the benchmark's eStargz peer).
const (
	StargzBinary    = "containerd-stargz-grpc"
	CtrRemoteBinary = "ctr-remote"
)

// StargzOptions configure StartStargz.
type StargzOptions struct {
	// Bin is the directory holding containerd-stargz-grpc.
	Bin string
	// Insecure are registry hosts (host:port) reached over plain HTTP.
	Insecure []string
	// Containerd is the daemon that mounts the snapshots: its tasks
	// are removed before the snapshotter stops.
	Containerd *Containerd
	// Address is the snapshotter socket; a new one when empty.
	Address string
	// LogLevel; "info" when empty.
	LogLevel string
}

// Stargz is a running containerd-stargz-grpc.
type Stargz struct {
	Address    string
	Root       string
	Dir        string
	ConfigPath string
	proc       *Process
}

// StargzConfig is the stargz-snapshotter config.toml of StartStargz: its
// defaults, each insecure host a plain-HTTP mirror of itself.
func StargzConfig(insecure []string) string {
	var b strings.Builder
	b.WriteString("# stargz-snapshotter defaults; the benchmark's registries speak plain HTTP.\n")
	for _, h := range insecure {
		fmt.Fprintf(&b, "\n[[resolver.host.%q.mirrors]]\nhost = %q\ninsecure = true\n", h, h)
	}
	return b.String()
}

// StartStargz runs containerd-stargz-grpc with a private root, socket and
// config. Cleanup removes the containerd's tasks (their rootfs sit on the
// snapshotter's mounts), stops the daemon by PID with SIGTERM (it closes
// the snapshotter, which unmounts its FUSE filesystems) and lazily
// unmounts leftovers under its root.
func StartStargz(t T, opts StargzOptions) *Stargz {
	t.Helper()
	bin := filepath.Join(opts.Bin, StargzBinary)
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("stargz snapshotter: %v", err)
	}
	dir := ShortTempDir(t, "sgz-")
	s := &Stargz{Dir: dir, Root: filepath.Join(dir, "root"), Address: opts.Address, ConfigPath: filepath.Join(dir, "config.toml")}
	if s.Address == "" {
		s.Address = filepath.Join(dir, "sgz.sock")
	}
	if err := os.WriteFile(s.ConfigPath, []byte(StargzConfig(opts.Insecure)), 0o644); err != nil {
		t.Fatalf("stargz config: %v", err)
	}
	level := opts.LogLevel
	if level == "" {
		level = "info"
	}
	p, err := startProcess("containerd-stargz-grpc", filepath.Join(dir, "stargz.log"), nil, bin,
		"--root", s.Root, "--address", s.Address, "--config", s.ConfigPath, "--log-level", level)
	if err != nil {
		t.Fatalf("stargz snapshotter: %v", err)
	}
	s.proc = p
	t.Cleanup(func() {
		if opts.Containerd != nil {
			opts.Containerd.removeTasks(t)
		}
		p.Stop(15 * time.Second)
		p.dumpOnFailure(t)
		if err := UnmountUnder(s.Root); err != nil {
			t.Logf("stargz cleanup: %v", err)
		}
	})
	if err := waitFor(p, 60*time.Second, func() error {
		c, err := net.Dial("unix", s.Address)
		if err != nil {
			return err
		}
		return c.Close()
	}); err != nil {
		t.Fatalf("start stargz snapshotter: %v\n%s", err, p.Log(32<<10))
	}
	t.Logf("containerd-stargz-grpc pid %d on %s", p.PID(), s.Address)
	return s
}

// Log returns the tail of the snapshotter's log.
func (s *Stargz) Log() string { return s.proc.Log(64 << 10) }
