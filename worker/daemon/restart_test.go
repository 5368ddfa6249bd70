package daemon

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/namespaces"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/config"
	"github.com/starlight-project/starlight/worker/fdstore"
	"github.com/starlight-project/starlight/worker/internal/fakeregistry"
)

// The test binary is the fd-holder of the workers these tests start: a
// real separate process, as `starlight-worker fd-holder` is.
func TestMain(m *testing.M) {
	if len(os.Args) == 3 && os.Args[1] == "fd-holder-for-test" {
		if err := fdstore.Serve(context.Background(), os.Args[2], time.Second); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestRestartKeepsViewsAndResumesPull stops the worker while a pull is
// half way and a reader waits, in another process, for a chunk that has
// not arrived; then starts a new worker on the same root. The reader gets
// the right bytes (the new worker took the view over and the pull resumed
// by itself), the resumed request is the first one's with the frames that
// had arrived skipped, and the image shows as pulling, then complete.
func TestRestartKeepsViewsAndResumesPull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIPPING: needs root (FUSE mounts)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("SKIPPING: needs /dev/fuse")
	}
	dir, err := os.MkdirTemp("", "slr")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	big := make([]byte, 8<<16)
	rand.New(rand.NewSource(1)).Read(big)
	img := fakeregistry.BuildImage(t, 1<<16, []fakeregistry.File{
		{Name: "small", Type: api.TypeReg, Mode: 0o644, Data: []byte("small\n")},
		{Name: "big", Type: api.TypeReg, Mode: 0o644, Data: big},
	})
	manifest := digest.FromString("pushed manifest of " + t.Name())
	// Every stream breaks in frame 3 (after small and 2 chunks of big):
	// the first one is resumed at once, the next one brings nothing and
	// the worker would try again only after an hour.
	reg := &fakeregistry.Registry{Image: img, Refs: []string{"app@" + manifest.String()}, BreakInFrame: 3}
	host := fakeregistry.Start(t, reg)

	cfg := workerConfig(dir, config.Registry{Host: host, PlainHTTP: true})
	cfg.FDStore = "holder"
	cfg.DemandFetches = 0 // reads wait for the stream, not for a ranged GET
	holder := WithHolderCommand([]string{os.Args[0], "fd-holder-for-test", cfg.FDHolderSocket()})
	t.Cleanup(func() {
		unmountUnder(t, dir)
		// The holder exits once the views it kept are gone; stop it
		// anyway if it did not.
		if b, err := os.ReadFile(cfg.FDHolderSocket() + ".pid"); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	w1 := serveWorker(t, cfg, WithPullBackoff(time.Hour), holder)
	ref := host + "/app:v1"
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	if err := w1.d.Puller.FetchCRI(ctx, ref, manifest); err != nil {
		t.Fatal(err)
	}
	waitImage(t, w1.client, ref, func(i api.WorkerImage) bool { return i.FramesReceived == 3 })
	for len(reg.Requests()) < 2 {
		time.Sleep(10 * time.Millisecond) // the resumed stream, broken at once
	}
	layer := digest.Digest(img.Layers[0].Digest)
	mnt, err := w1.d.Layers.Dir(ctx, layer) // as the snapshotter mounts a rootfs
	if err != nil {
		t.Fatal(err)
	}

	// A direct read of the last chunk: a FUSE request that waits.
	cmd := exec.Command("dd", "if="+filepath.Join(mnt, "big"), "iflag=direct", "bs=65536", "skip=7", "count=1", "status=none")
	var out bytes.Buffer
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	waitInFUSE(t, cmd.Process.Pid)

	w1.stop()
	reg.SetBreakInFrame(0)
	select {
	case err := <-exited:
		t.Fatalf("the reader ended while no worker ran: %v", err)
	default:
	}

	w2 := serveWorker(t, cfg, WithPullBackoff(10*time.Millisecond), holder)
	if im := waitImage(t, w2.client, ref, func(api.WorkerImage) bool { return true }); im.State == api.PullFailed {
		t.Fatalf("after the restart the image shows as failed: %+v", im)
	}
	select {
	case err := <-exited:
		if err != nil || !bytes.Equal(out.Bytes(), big[7<<16:]) {
			t.Fatalf("the read that waited across the restart: %v, %d bytes, right %v", err, out.Len(), bytes.Equal(out.Bytes(), big[7<<16:]))
		}
	case <-time.After(60 * time.Second):
		t.Fatal("the read that waited across the restart never completed")
	}
	got := waitImage(t, w2.client, ref, func(i api.WorkerImage) bool { return i.State == api.PullComplete })
	if !got.Complete || got.Resumes < 1 {
		t.Errorf("image after the restart: %+v", got)
	}
	reqs := reg.Requests()
	if len(reqs) != 3 {
		t.Fatalf("%d delta requests, want 3 (the pull, its resumption, the one after the restart): %+v", len(reqs), reqs)
	}
	if r := reqs[2]; r.Resume != 3 || r.Reference != reqs[0].Reference || !reflect.DeepEqual(r.Have, reqs[0].Have) {
		t.Errorf("request after the restart %+v, want the first (%+v) from frame 3", r, reqs[0])
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "small")); err != nil || string(b) != "small\n" {
		t.Errorf("small after the restart: %q, %v", b, err)
	}
}

// waitInFUSE waits until pid sleeps in a FUSE request.
func waitInFUSE(t *testing.T, pid int) {
	t.Helper()
	wchan := filepath.Join("/proc", strconv.Itoa(pid), "wchan")
	for deadline := time.Now().Add(30 * time.Second); ; {
		b, _ := os.ReadFile(wchan)
		if strings.Contains(string(b), "fuse") || strings.Contains(string(b), "request_wait_answer") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d never blocked in FUSE (wchan %q)", pid, b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
