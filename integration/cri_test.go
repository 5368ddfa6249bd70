package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/starlight-project/starlight/integration/harness"
	"github.com/starlight-project/starlight/worker/client"
)

// TestCRIPullIsAccelerated is the Kubernetes path: `crictl pull` against
// containerd's CRI plugin, configured with the starlight snapshotter and
// snapshot annotations on, and no Starlight command at all. containerd
// fetches the pushed manifest and config; the worker answers the Prepare
// of every layer (named by its pushed gzip digest) with the converted
// layer, so containerd never downloads a layer blob; the image runs while
// the bundle streams.
func TestCRIPullIsAccelerated(t *testing.T) {
	requireRoot(t)
	crictl, err := exec.LookPath("crictl")
	if err != nil {
		t.Skip("SKIPPED: crictl is not installed (hack/install-deps.sh installs it)")
	}
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	docker := harness.SharedDockerd(t)
	spec := harness.TrickyImage("starlight-test/tricky:cri")
	img := harness.BuildImage(t, spec)
	const repo, tag = "e2e/cri", "v1"
	ref := reg.Addr + "/" + repo + ":" + tag
	docker.Push(t, img, ref)
	reg.WaitReady(t, repo, tag)
	manifest, layers := pushedManifest(t, reg.URL, repo, tag)

	dir := harness.ShortTempDir(t, "cri-")
	snSock := filepath.Join(dir, "sn.sock")
	ctd := startCRIContainerd(t, dir, snSock, reg.Addr)
	w := harness.StartWorker(t, harness.WorkerOptions{Registries: []string{reg.URL}, Containerd: ctd, Address: snSock})

	const ns = "k8s.io"
	timed(t, "crictl pull", func() {
		out, err := exec.Command(crictl, "--runtime-endpoint", "unix://"+ctd.Address, "--timeout", "5m", "pull", ref).CombinedOutput()
		if err != nil {
			t.Fatalf("crictl pull: %v\n%s", err, out)
		}
		t.Logf("crictl pull: %s", strings.TrimSpace(string(out)))
	})

	out, err := exec.Command(crictl, "--runtime-endpoint", "unix://"+ctd.Address, "images").CombinedOutput()
	if err != nil {
		t.Fatalf("crictl images: %v\n%s", err, out)
	}
	mustContain(t, "crictl images", string(out), reg.Addr+"/"+repo)

	// containerd holds the pushed manifest and config, not one layer blob.
	content := ctd.CtrNS(t, ns, "content", "ls", "-q")
	mustContain(t, "containerd content", content, manifest)
	for i, l := range layers {
		if strings.Contains(content, l) {
			t.Errorf("containerd downloaded pushed layer %d (%s):\n%s", i, l, content)
		}
	}

	// The worker pulled the image for CRI, under its reference.
	var got client.Image
	deadline := time.Now().Add(3 * time.Minute)
	for {
		got = w.Progress(t, ref, ns)
		if got.Complete || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !got.Complete || len(got.Layers) != len(layers) || got.FramesTotal == 0 || got.FramesReceived != got.FramesTotal {
		t.Errorf("worker's record of the CRI pull: %+v", got)
	}

	run := ctd.CtrNS(t, ns, "run", "--rm", "--snapshotter", "starlight", ref, uniqueID("cri"), "cat", "/data/hello.txt", "/small.txt")
	mustContain(t, "ctr run of the CRI-pulled image", run, "hello again from layer 3", "small file at the root")
}

// pushedManifest returns the digest of the manifest pushed as repo:tag
// and its layer digests.
func pushedManifest(t *testing.T, base, repo, tag string) (string, []string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, base+"/v2/"+repo+"/manifests/"+tag, nil)
	req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m struct {
		Layers []struct {
			Digest string `json:"digest"`
		} `json:"layers"`
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("manifest of %s:%s: %s", repo, tag, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		t.Fatal(err)
	}
	var layers []string
	for _, l := range m.Layers {
		layers = append(layers, l.Digest)
	}
	if len(layers) < 2 {
		t.Fatalf("pushed image has %d layers; the test wants several", len(layers))
	}
	return resp.Header.Get("Docker-Content-Digest"), layers
}

// startCRIContainerd runs a private containerd with the CRI plugin on,
// pulling into the starlight snapshotter with CRI's snapshot annotations,
// and plain HTTP to the test registry. No CNI: the test stops before pod
// sandboxes.
func startCRIContainerd(t *testing.T, dir, snSock, registry string) *harness.Containerd {
	t.Helper()
	c := &harness.Containerd{
		Dir:       dir,
		Address:   filepath.Join(dir, "c.sock"),
		Root:      filepath.Join(dir, "root"),
		State:     filepath.Join(dir, "state"),
		Namespace: "k8s.io",
	}
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %q

[ttrpc]
  address = %q

[debug]
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = %q

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
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

[proxy_plugins.starlight]
  type = "snapshot"
  address = %q
`, c.Root, c.State, c.Address, c.Address+".ttrpc", filepath.Join(dir, "opt"), registry,
		filepath.Join(dir, "cni-bin"), filepath.Join(dir, "cni-conf"), registry, registry, snSock)
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(harness.ContainerdBinary, "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
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
			s := string(b)
			if len(s) > 16000 {
				s = s[len(s)-16000:]
			}
			t.Logf("containerd log (tail):\n%s", s)
		}
		for _, d := range []string{c.State, c.Root} {
			if err := harness.UnmountUnder(d); err != nil {
				t.Logf("containerd cleanup: %v", err)
			}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for {
		if _, err := c.CtrE("version"); err == nil {
			return c
		}
		if ctx.Err() != nil {
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("containerd with CRI did not come up:\n%s", b)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
