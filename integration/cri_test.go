package integration

import (
	"encoding/json"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/integration/harness"
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
	ctd := harness.StartContainerd(t, harness.ContainerdOptions{StarlightSocket: snSock, Namespace: "k8s.io", CRIRegistry: reg.Addr})
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
	var got api.WorkerImage
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
