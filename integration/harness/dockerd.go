package harness

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Paths of Debian's docker.io daemon and client. The client is named
// explicitly: another docker client on PATH may not speak to this daemon.
const (
	DockerdBinary = "/usr/sbin/dockerd"
	DockerBinary  = "/usr/bin/docker"
)

// Dockerd is a private docker daemon, used to load and push test images
// with a real `docker push`.
type Dockerd struct {
	Host      string // unix://...
	Dir       string
	configDir string // DOCKER_CONFIG of the client
	proc      *Process
}

// StartDockerd starts dockerd with its own data root, exec root and socket,
// no bridge and no iptables, on a private containerd. Loopback registries
// are insecure by default, so pushes to 127.0.0.1:PORT go over plain HTTP.
func StartDockerd(t T) *Dockerd {
	t.Helper()
	dir := ShortTempDir(t, "dkd-")
	// dockerd would use the system containerd if /run/containerd/containerd.sock
	// exists; a private one keeps the test hermetic. Debian's 1.6, the one
	// Debian's dockerd is built for, whatever $STARLIGHT_CONTAINERD says:
	// dockerd builds and pushes the test images, it is not under test.
	ctd := StartContainerd(t, ContainerdOptions{Version: Containerd16})
	d := &Dockerd{Dir: dir, Host: "unix://" + filepath.Join(dir, "d.sock"), configDir: filepath.Join(dir, "client")}
	if err := os.MkdirAll(d.configDir, 0o700); err != nil {
		t.Fatalf("dockerd: %v", err)
	}
	// An empty client config: no credential helpers of the host.
	if err := os.WriteFile(filepath.Join(d.configDir, "config.json"), []byte("{}\n"), 0o600); err != nil {
		t.Fatalf("dockerd: %v", err)
	}
	daemonJSON := filepath.Join(dir, "daemon.json")
	if err := os.WriteFile(daemonJSON, []byte("{}\n"), 0o644); err != nil {
		t.Fatalf("dockerd: %v", err)
	}
	p, err := startProcess("dockerd", filepath.Join(dir, "dockerd.log"), nil, DockerdBinary,
		"--config-file", daemonJSON,
		"--iptables=false", "--ip-masq=false", "--bridge=none",
		"--data-root", filepath.Join(dir, "data"),
		"--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "dockerd.pid"),
		"--host", d.Host,
		"--containerd", ctd.Address,
		"--containerd-namespace", "moby",
		"--containerd-plugins-namespace", "moby-plugins",
	)
	if err != nil {
		t.Fatalf("dockerd: %v", err)
	}
	d.proc = p
	t.Cleanup(func() {
		p.Stop(20 * time.Second)
		p.dumpOnFailure(t)
		_ = UnmountUnder(dir)
	})
	if err := waitFor(p, 2*time.Minute, func() error {
		_, err := d.DockerE("version")
		return err
	}); err != nil {
		t.Fatalf("start dockerd: %v\n%s", err, p.Log(32<<10))
	}
	t.Logf("dockerd pid %d on %s", p.PID(), d.Host)
	return d
}

var sharedDockerd struct {
	once sync.Once
	d    *Dockerd
	err  error
}

// SharedDockerd returns one dockerd for the whole test binary, started on
// first use and stopped by Main (use harness.Main from TestMain).
func SharedDockerd(t T) *Dockerd {
	t.Helper()
	sharedDockerd.once.Do(func() {
		sharedDockerd.err = shared.Run(func() { sharedDockerd.d = StartDockerd(shared) })
	})
	if sharedDockerd.err != nil {
		t.Fatalf("shared dockerd: %v", sharedDockerd.err)
	}
	return sharedDockerd.d
}

// DockerE runs `docker -H HOST args...` and returns its combined output.
func (d *Dockerd) DockerE(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, DockerBinary, append([]string{"-H", d.Host}, args...)...)
	cmd.Env = append(os.Environ(), "DOCKER_CONFIG="+d.configDir)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("docker %s: %w\n%s", strings.Join(args, " "), err, out.String())
	}
	return out.String(), nil
}

// Docker is DockerE that fails the test on error.
func (d *Dockerd) Docker(t T, args ...string) string {
	t.Helper()
	out, err := d.DockerE(args...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return out
}

// Push loads the docker-save archive img, tags it as ref
// ("127.0.0.1:PORT/repo:tag") and pushes it with `docker push`.
func (d *Dockerd) Push(t T, img *Image, ref string) {
	t.Helper()
	d.Docker(t, "load", "-i", img.Archive)
	d.Docker(t, "tag", img.Name, ref)
	d.Docker(t, "push", ref)
	// Untag so that a later push of another image under the same name in
	// another test does not depend on this one.
	_, _ = d.DockerE("rmi", ref)
}
