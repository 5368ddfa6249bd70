package harness

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/client"
)

// WorkerOptions configure StartWorker.
type WorkerOptions struct {
	// Registries are the starlight-registry endpoints (http://HOST:PORT).
	Registries []string
	// Containerd the worker talks to. Its StarlightSocket must be Address.
	Containerd *Containerd
	// Address is the snapshotter socket; a new one when empty (then the
	// containerd must be started with it: use StartNode).
	Address string
	// LogLevel of the worker; "debug" when empty.
	LogLevel string
	// Metrics serves the worker's Prometheus metrics on an ephemeral
	// port (see Worker.Metric).
	Metrics bool
	// Args are more command line flags ("--hosts-dir", dir).
	Args []string
	// Env is added to the worker's environment ("DOCKER_CONFIG=dir").
	Env []string
	// Root is the worker's state directory (--root); a new one in the
	// worker's private directory when empty. A test may give one on a
	// filesystem of its own (a small tmpfs to fill).
	Root string
}

// Worker is a running starlight-worker.
type Worker struct {
	Root    string
	Address string // snapshotter socket
	API     string // API socket for ctr-starlight
	// CRIProxy is the worker's CRI proxy socket (crictl --image-endpoint).
	CRIProxy string
	Dir      string
	// MetricsAddr is the metrics listen address, if WorkerOptions.Metrics.
	MetricsAddr string
	proc        *Process
	bin         string
	// How to start it again (Restart): the worker binary, its arguments
	// and environment, its log.
	workerBin string
	args      []string
	env       []string
	logPath   string
	ctd       *Containerd
}

// StartWorker runs bin/starlight-worker with a private root and sockets.
// Cleanup removes the containers' tasks (their rootfs sit on the worker's
// mounts), stops the worker by PID with SIGTERM, lazily unmounts what is
// left under its root (the layer views outlive the worker) and stops the
// fd-holder that kept their connections.
func StartWorker(t T, opts WorkerOptions) *Worker {
	t.Helper()
	bins := Binaries(t)
	dir := ShortTempDir(t, "wrk-")
	w := &Worker{
		Dir:       dir,
		Root:      opts.Root,
		Address:   opts.Address,
		API:       filepath.Join(dir, "api.sock"),
		CRIProxy:  filepath.Join(dir, "cri.sock"),
		bin:       filepath.Join(bins, CLIBinary),
		workerBin: filepath.Join(bins, WorkerBinary),
		env:       opts.Env,
		logPath:   filepath.Join(dir, "worker.log"),
		ctd:       opts.Containerd,
	}
	if w.Root == "" {
		w.Root = filepath.Join(dir, "root")
	}
	if w.Address == "" {
		w.Address = filepath.Join(dir, "sn.sock")
	}
	level := opts.LogLevel
	if level == "" {
		level = "debug"
	}
	args := []string{"--root", w.Root, "--address", w.Address, "--api", w.API, "--cri-proxy", w.CRIProxy, "--log-level", level}
	if opts.Containerd != nil {
		args = append(args, "--containerd", opts.Containerd.Address)
		if opts.Containerd.Version == Containerd2 {
			// containerd 2 cannot mount materialised layers yet
			// (worker config materialize).
			args = append(args, "--materialize=false")
		}
	}
	for _, r := range opts.Registries {
		args = append(args, "--registry", r)
	}
	if opts.Metrics {
		port, err := FreePort()
		if err != nil {
			t.Fatalf("worker: %v", err)
		}
		w.MetricsAddr = fmt.Sprintf("127.0.0.1:%d", port)
		args = append(args, "--metrics", w.MetricsAddr)
	}
	w.args = append(args, opts.Args...)
	t.Cleanup(func() {
		if opts.Containerd != nil {
			opts.Containerd.removeTasks(t)
		}
		if w.proc != nil {
			w.proc.Stop(15 * time.Second)
			w.proc.dumpOnFailure(t)
		}
		if err := UnmountUnder(w.Root); err != nil {
			t.Logf("worker cleanup: %v", err)
		}
		w.stopHolder(t)
	})
	w.start(t)
	return w
}

// start runs the worker process and waits until it serves.
func (w *Worker) start(t T) {
	t.Helper()
	p, err := startProcess("starlight-worker", w.logPath, w.env, w.workerBin, w.args...)
	if err != nil {
		t.Fatalf("worker: %v", err)
	}
	w.proc = p
	if err := waitFor(p, 60*time.Second, func() error {
		for _, s := range []string{w.Address, w.API, w.CRIProxy} {
			c, err := net.Dial("unix", s)
			if err != nil {
				return err
			}
			c.Close()
		}
		return nil
	}); err != nil {
		t.Fatalf("start worker: %v\n%s", err, p.Log(32<<10))
	}
	// containerd dials its proxy snapshotters in the background from its
	// own start; a dial that failed (the worker was not listening yet)
	// leaves the connection in gRPC's reconnect backoff, during which
	// containerd's own clients (crictl, ctr) are refused although the
	// worker serves. Wait until containerd reaches it.
	if c := w.ctd; c != nil && c.starlightSocket == w.Address {
		if err := waitFor(p, 60*time.Second, func() error {
			_, err := c.CtrE("snapshots", "--snapshotter", "starlight", "ls")
			return err
		}); err != nil {
			t.Fatalf("containerd does not reach the worker's snapshotter: %v", err)
		}
	}
	t.Logf("starlight-worker pid %d, snapshotter %s, api %s", p.PID(), w.Address, w.API)
}

// Kill kills the worker with SIGKILL, as a crash would, and waits until it
// is gone.
func (w *Worker) Kill(t T) {
	t.Helper()
	if err := w.proc.cmd.Process.Kill(); err != nil {
		t.Fatalf("kill worker: %v", err)
	}
	<-w.proc.Done()
}

// Stop stops the worker with SIGTERM, as systemctl stop does, and waits
// until it has exited.
func (w *Worker) Stop(t T) {
	t.Helper()
	w.proc.Stop(60 * time.Second)
}

// Restart starts the stopped or killed worker again, on the same root and
// sockets (its log goes on in the same file).
func (w *Worker) Restart(t T) {
	t.Helper()
	if ok, _ := w.proc.Exited(); !ok {
		t.Fatalf("restart: the worker (pid %d) still runs", w.proc.PID())
	}
	w.start(t)
}

// PID is the worker's process id.
func (w *Worker) PID() int { return w.proc.PID() }

// stopHolder stops the fd-holder the worker started, if it still runs: it
// exits by itself once it holds nothing, which takes a few seconds after
// the views are unmounted.
func (w *Worker) stopHolder(t T) {
	b, err := os.ReadFile(filepath.Join(w.Root, "fd-holder.sock.pid"))
	if err != nil {
		return
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return
	}
	alive := func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		f := strings.Fields(string(b))
		return err == nil && len(f) > 2 && f[2] != "Z" && strings.Contains(f[1], "starlight")
	}
	if !alive() {
		return
	}
	syscall.Kill(pid, syscall.SIGTERM)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if !alive() {
			return
		}
	}
	t.Logf("fd-holder %d ignores SIGTERM; killing it", pid)
	syscall.Kill(pid, syscall.SIGKILL)
}

// Node is a containerd with the starlight proxy snapshotter and its worker.
type Node struct {
	Containerd *Containerd
	Worker     *Worker
}

// StartNode starts a private containerd wired to a new starlight-worker
// that pulls from registries.
func StartNode(t T, registries ...string) *Node {
	t.Helper()
	return StartNodeWith(t, WorkerOptions{Registries: registries})
}

// StartNodeWith is StartNode with more worker options; their Containerd
// and Address are set by it.
func StartNodeWith(t T, opts WorkerOptions) *Node {
	t.Helper()
	return StartNodeOn(t, ContainerdDefault, opts)
}

// StartNodeOn is StartNodeWith on containerd version v.
func StartNodeOn(t T, v ContainerdVersion, opts WorkerOptions) *Node {
	t.Helper()
	dir := ShortTempDir(t, "node-")
	opts.Address = filepath.Join(dir, "sn.sock")
	opts.Containerd = StartContainerd(t, ContainerdOptions{StarlightSocket: opts.Address, Version: v})
	w := StartWorker(t, opts)
	return &Node{Containerd: opts.Containerd, Worker: w}
}

// Log returns the tail of the worker log.
func (w *Worker) Log() string { return w.proc.Log(64 << 10) }

// CLIE runs `ctr-starlight --worker API --namespace ns args...`.
func (w *Worker) CLIE(ns string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, w.bin, append([]string{"--worker", w.API, "--namespace", ns}, args...)...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	cmd.Stdin = nil
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("ctr-starlight %s: %w\n%s", strings.Join(args, " "), err, out.String())
	}
	return out.String(), nil
}

// CLI is CLIE that fails the test on error.
func (w *Worker) CLI(t T, ns string, args ...string) string {
	t.Helper()
	out, err := w.CLIE(ns, args...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return out
}

// Images asks the worker for the state and progress of its images
// (GET /v1/images on the API socket).
func (w *Worker) Images() ([]api.WorkerImage, error) {
	c := client.New(w.API)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return c.Images(ctx)
}

// Progress returns the worker's state of ref in namespace ns.
func (w *Worker) Progress(t T, ref, ns string) api.WorkerImage {
	t.Helper()
	imgs, err := w.Images()
	if err != nil {
		t.Fatalf("worker images: %v", err)
	}
	for _, im := range imgs {
		if im.Ref == ref && (ns == "" || im.Namespace == ns) {
			return im
		}
	}
	t.Fatalf("the worker does not report %s in namespace %q: %+v", ref, ns, imgs)
	return api.WorkerImage{}
}

// Metric returns the value of one series of the worker's metrics, given as
// it appears in the exposition format (`name{label="v"}`), or 0 if the
// worker does not export it yet. The worker must have been started with
// WorkerOptions.Metrics.
func (w *Worker) Metric(t T, series string) float64 {
	t.Helper()
	if w.MetricsAddr == "" {
		t.Fatalf("worker metrics: started without WorkerOptions.Metrics")
	}
	resp, err := http.Get("http://" + w.MetricsAddr + "/metrics")
	if err != nil {
		t.Fatalf("worker metrics: %v", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), " ")
		if ok && name == series {
			v, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
			if err != nil {
				t.Fatalf("worker metrics: %s: %v", series, err)
			}
			return v
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("worker metrics: %v", err)
	}
	return 0
}
