package daemon

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/client"
	"github.com/starlight-project/starlight/worker/config"
	"github.com/starlight-project/starlight/worker/importer"
	"github.com/starlight-project/starlight/worker/internal/fakeregistry"
	"github.com/starlight-project/starlight/worker/pull"
)

// requireRuntime skips (loudly) a test that needs root, FUSE and
// containerd.
func requireRuntime(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPING: needs root (FUSE mounts, containerd)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("SKIPPING: needs /dev/fuse")
	}
	for _, bin := range []string{"/usr/bin/containerd", "/usr/bin/ctr", "/bin/busybox"} {
		if _, err := os.Stat(bin); err != nil {
			t.Skipf("SKIPPING: needs %s", bin)
		}
	}
}

// startContainerd runs a private containerd with the starlight proxy
// snapshotter at snSocket, and returns its socket.
func startContainerd(t *testing.T, dir, snSocket string) string {
	t.Helper()
	sock := filepath.Join(dir, "containerd.sock")
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = %q

[ttrpc]
  address = %q

[plugins."io.containerd.internal.v1.opt"]
  path = %q

[proxy_plugins.starlight]
  type = "snapshot"
  address = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), sock, sock+".ttrpc", filepath.Join(dir, "opt"), snSocket)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("/usr/bin/containerd", "--config", cfgPath, "--log-level", "debug")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("containerd log (tail):\n%s", tail(string(b), 4000))
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := containerd.New(sock, containerd.WithTimeout(time.Second))
		if err == nil {
			ok, _ := c.IsServing(context.Background())
			c.Close()
			if ok {
				return sock
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not come up: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// unmountUnder detaches every mount left below dir, so that a failed test
// never leaves a mount (or a FUSE server's corpse) in the host.
func unmountUnder(t *testing.T, dir string) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	defer f.Close()
	var mps []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			mps = append(mps, fields[4])
		}
	}
	for i := len(mps) - 1; i >= 0; i-- {
		if err := syscall.Unmount(mps[i], syscall.MNT_DETACH); err == nil {
			t.Logf("detached leftover mount %s", mps[i])
		}
	}
}

type testWorker struct {
	cfg    *config.Config
	d      *Daemon
	client *client.Client
	// stop stops the worker and waits for it (once; the test's cleanup
	// calls it too).
	stop func()
}

// startWorker runs a worker in-process until the test ends. Its views end
// with it (fd_store = "off").
func startWorker(t *testing.T, dir string, registries ...config.Registry) *testWorker {
	t.Helper()
	t.Cleanup(func() { unmountUnder(t, dir) }) // after the worker stopped
	return serveWorker(t, workerConfig(dir, registries...), WithPullBackoff(10*time.Millisecond))
}

// workerConfig is the configuration of a test worker under dir.
func workerConfig(dir string, registries ...config.Registry) *config.Config {
	cfg := config.Default()
	cfg.Root = filepath.Join(dir, "worker")
	cfg.Address = filepath.Join(dir, "sn.sock")
	cfg.API = filepath.Join(dir, "api.sock")
	cfg.Containerd = filepath.Join(dir, "ctrd", "containerd.sock")
	cfg.Registries = registries
	cfg.PullRetries = 2
	cfg.FDStore = "off"
	return cfg
}

// serveWorker runs a worker with cfg in-process until stop or the end of
// the test.
func serveWorker(t *testing.T, cfg *config.Config, opts ...Option) *testWorker {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	d, err := New(ctx, cfg, opts...)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx, func() { close(ready) }) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("worker: %v", err)
				}
			case <-time.After(30 * time.Second):
				t.Errorf("worker did not stop")
			}
		})
	}
	t.Cleanup(stop)
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("worker: %v", err)
	}
	c := client.New(cfg.API)
	t.Cleanup(c.Close)
	return &testWorker{cfg: cfg, d: d, client: c, stop: stop}
}

func waitImage(t *testing.T, c *client.Client, ref string, cond func(api.WorkerImage) bool) api.WorkerImage {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		img, err := c.Image(context.Background(), ref, "")
		if err != nil {
			t.Fatal(err)
		}
		if cond(*img) {
			return *img
		}
		if time.Now().After(deadline) {
			t.Fatalf("image %s: condition not reached: %+v", ref, img)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestPullRunsInContainerd drives the whole pull flow against a fake
// registry and a real containerd: the image becomes usable before its
// contents arrive, a broken stream is resumed, a container runs from the
// starlight snapshotter, and a second pull sends the complete layers as
// Have.
func TestPullRunsInContainerd(t *testing.T) {
	requireRuntime(t)
	dir, err := os.MkdirTemp("", "slw") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	img := fakeregistry.BuildImage(t, 256<<10,
		[]fakeregistry.File{
			{Name: "bin", Type: api.TypeDir, Mode: 0o755},
			{Name: "bin/busybox", Type: api.TypeReg, Mode: 0o755, Data: busybox},
			{Name: "bin/cat", Type: api.TypeSymlink, Link: "busybox", Mode: 0o777},
			{Name: "bin/sh", Type: api.TypeSymlink, Link: "busybox", Mode: 0o777},
			{Name: "etc", Type: api.TypeDir, Mode: 0o755},
			{Name: "etc/old.txt", Type: api.TypeReg, Mode: 0o644, Data: []byte("removed by the next layer\n")},
		},
		[]fakeregistry.File{
			{Name: "etc", Type: api.TypeDir, Mode: 0o755},
			{Name: "etc/.wh.old.txt", Type: api.TypeReg, Mode: 0o644},
			{Name: "etc/hello.txt", Type: api.TypeReg, Mode: 0o644, Data: []byte("hello from starlight\n")},
			{Name: "etc/empty", Type: api.TypeReg, Mode: 0o600},
		},
	)
	reg := &fakeregistry.Registry{Image: img, User: "alice", Password: "s3cret", Gate: make(chan struct{}), BreakAfter: 2}
	host := fakeregistry.Start(t, reg)
	ref := host + "/app:v1"

	// A registry whose bundle keeps breaking, always in its second frame.
	data := bytes.Repeat([]byte("lost "), 100000)
	broken := fakeregistry.BuildImage(t, 64<<10, []fakeregistry.File{
		{Name: "small", Type: api.TypeReg, Mode: 0o644, Data: []byte("arrives\n")}, // the first frame
		{Name: "data", Type: api.TypeReg, Mode: 0o644, Data: data},
	})
	breg := &fakeregistry.Registry{Image: broken, BreakInFrame: 1}
	bhost := fakeregistry.Start(t, breg)

	w := startWorker(t, dir, config.Registry{Host: host, PlainHTTP: true, Username: "alice", Password: "s3cret"},
		config.Registry{Host: bhost, PlainHTTP: true})
	sock := startContainerd(t, filepath.Join(dir, "ctrd"), w.cfg.Address)

	ctx := namespaces.WithNamespace(context.Background(), "default")
	var events []api.PullEvent
	if err := w.client.Pull(ctx, api.PullRequest{Ref: ref, Namespace: "default"}, func(ev api.PullEvent) {
		events = append(events, ev)
	}); err != nil {
		t.Fatalf("pull: %v", err)
	}
	last := events[len(events)-1]
	if last.Status != api.PullReady || last.FramesTotal == 0 || last.FramesReceived != 0 {
		t.Fatalf("last event %+v, want ready with no frame received yet", last)
	}

	// Usable while nothing has arrived: the registry holds the frames.
	cc, err := containerd.New(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	cimg, err := cc.GetImage(ctx, ref)
	if err != nil {
		t.Fatalf("image not in containerd: %v", err)
	}
	if cimg.Target().Digest != img.ManifestDigest {
		t.Fatalf("image target %s, want %s", cimg.Target().Digest, img.ManifestDigest)
	}
	unpacked, err := cimg.IsUnpacked(ctx, importer.SnapshotterName)
	if err != nil || !unpacked {
		t.Fatalf("IsUnpacked(starlight) = %v, %v", unpacked, err)
	}
	st, err := w.client.Image(ctx, ref, "")
	if err != nil {
		t.Fatal(err)
	}
	if st.Complete || st.State != api.PullReady || st.Ready == nil {
		t.Fatalf("status before the frames: %+v", st)
	}

	// A container starts while nothing has arrived: its reads block in
	// the FUSE views until the frames they need are in.
	ctrRun := exec.Command("/usr/bin/ctr", "--address", sock, "run", "--rm", "--snapshotter", importer.SnapshotterName,
		ref, "sl-test-"+randomID(), "/bin/sh", "-c", "cat /etc/hello.txt; ls /etc; wc -c < /etc/empty")
	var out bytes.Buffer
	ctrRun.Stdout, ctrRun.Stderr = &out, &out
	if err := ctrRun.Start(); err != nil {
		t.Fatal(err)
	}
	ctrDone := make(chan error, 1)
	go func() { ctrDone <- ctrRun.Wait() }()
	t.Cleanup(func() {
		select {
		case <-ctrDone:
		default:
			ctrRun.Process.Kill()
		}
	})

	close(reg.Gate)
	st2 := waitImage(t, w.client, ref, func(i api.WorkerImage) bool {
		return i.State == api.PullComplete || i.State == api.PullFailed
	})
	if !st2.Complete || st2.Error != "" || st2.FramesReceived != st2.FramesTotal || st2.BytesReceived != st2.BytesTotal ||
		st2.FilesReceived != st2.FilesTotal || st2.Resumes != 1 {
		t.Fatalf("final status: %+v", st2)
	}
	reqs := reg.Requests()
	if len(reqs) != 2 || reqs[1].Resume != 2 || reqs[0].Platform != pull.DefaultPlatform {
		t.Fatalf("delta requests %+v, want the second resuming at frame 2", reqs)
	}

	// The container sees both layers with overlay semantics (the
	// whiteout hides old.txt).
	select {
	case err := <-ctrDone:
		if err != nil {
			t.Fatalf("ctr run: %v\n%s", err, out.String())
		}
	case <-time.After(2 * time.Minute):
		t.Fatalf("ctr run did not finish; output so far:\n%s", out.String())
	}
	if want := "hello from starlight\nempty\nhello.txt\n0\n"; out.String() != want {
		t.Fatalf("container printed %q, want %q", out.String(), want)
	}

	// A second pull holds every layer: Have lists them, nothing is sent.
	if err := w.client.Pull(ctx, api.PullRequest{Ref: ref, Wait: true}, nil); err != nil {
		t.Fatalf("second pull: %v", err)
	}
	reqs = reg.Requests()
	if have := reqs[len(reqs)-1].Have; len(have) != 2 {
		t.Fatalf("second request Have = %v, want both layers", have)
	}
	st3, _ := w.client.Image(ctx, ref, "default")
	if !st3.Complete || st3.FramesTotal != 0 || st3.DedupBytes != st3.ImageBytes {
		t.Fatalf("second pull status %+v", st3)
	}

	// Errors are the worker's message, verbatim.
	for _, tc := range []struct{ ref, want string }{
		{"127.0.0.1:1/app:v1", "host 127.0.0.1:1 is not a configured Starlight registry"},
		{host + "/missing:v1", "registry: NOT_FOUND: image missing:v1 not found"},
	} {
		err := w.client.Pull(ctx, api.PullRequest{Ref: tc.ref}, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("pull %s: error %v, want %q", tc.ref, err, tc.want)
		}
	}
	// A bundle that keeps breaking: resumed at once after the first frame
	// arrived, then pull_retries (2) times without progress, the pull
	// fails, and reads of what did not arrive fail with EIO instead of
	// hanging.
	bref := bhost + "/broken:v1"
	if err := w.client.Pull(ctx, api.PullRequest{Ref: bref, Wait: true}, nil); err == nil || !strings.Contains(err.Error(), "truncated") {
		t.Fatalf("pull of a breaking bundle: %v", err)
	}
	bst, _ := w.client.Image(ctx, bref, "")
	if bst.State != api.PullFailed || bst.Ready == nil || bst.Complete || bst.Resumes != 3 || len(breg.Requests()) != 4 {
		t.Fatalf("status %+v after %d requests", bst, len(breg.Requests()))
	}
	ldir, err := w.d.Layers.Dir(ctx, digest.Digest(broken.Layers[0].Digest))
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(ldir, "small")); err != nil || string(b) != "arrives\n" {
		t.Fatalf("arrived file: %q, %v", b, err)
	}
	if _, err := os.ReadFile(filepath.Join(ldir, "data")); !errors.Is(err, syscall.EIO) {
		t.Fatalf("reading a content that will not arrive: %v, want EIO", err)
	}

	imgs, err := w.client.Images(ctx)
	if err != nil || len(imgs) != 3 {
		t.Fatalf("images: %+v, %v", imgs, err)
	}
}

// randomID makes container and snapshot names unique across test runs.
func randomID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
