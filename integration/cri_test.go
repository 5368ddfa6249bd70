package integration

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
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
// the bundle streams. It runs against containerd 1.6 and containerd 2
// (whose CRI image service is its own plugin, configured apart from the
// runtime), each on the same registry and pushed image.
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
	manifest, layers := pushedManifest(t, reg, repo, tag)
	for _, v := range harness.ContainerdVersions {
		t.Run(v.String(), func(t *testing.T) { criPullIsAccelerated(t, v, crictl, reg, repo, ref, manifest, layers) })
	}
}

func criPullIsAccelerated(t *testing.T, v harness.ContainerdVersion, crictl string, reg *harness.Registry, repo, ref, manifest string, layers []string) {
	dir := harness.ShortTempDir(t, "cri-")
	snSock := filepath.Join(dir, "sn.sock")
	ctd := harness.StartContainerd(t, harness.ContainerdOptions{StarlightSocket: snSock, Namespace: "k8s.io", CRIRegistry: reg.Addr, Version: v})
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
	got := waitComplete(t, w, ref, ns)
	if !got.Complete || len(got.Layers) != len(layers) || got.FramesTotal == 0 || got.FramesReceived != got.FramesTotal {
		t.Errorf("worker's record of the CRI pull: %+v", got)
	}

	run := ctd.CtrNS(t, ns, "run", "--rm", "--snapshotter", "starlight", ref, uniqueID("cri"), "cat", "/data/hello.txt", "/small.txt")
	mustContain(t, "ctr run of the CRI-pulled image", run, "hello again from layer 3", "small file at the root")

	// kubelet's image garbage collection (here crictl rmi) frees the
	// worker's storage: the worker follows containerd's deletion. A record
	// is kept 10 s after its pull ended (containerd may still be creating
	// the image of a CRI pull).
	store := filepath.Join(w.Root, "store")
	before := dirBytes(t, store)
	time.Sleep(time.Until(got.Completed.Add(11 * time.Second)))
	if out, err := exec.Command(crictl, "--runtime-endpoint", "unix://"+ctd.Address, "rmi", ref).CombinedOutput(); err != nil {
		t.Fatalf("crictl rmi: %v\n%s", err, out)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		imgs, err := w.Images()
		if err != nil {
			t.Fatal(err)
		}
		gone := true
		for _, im := range imgs {
			gone = gone && im.Ref != ref
		}
		if after := dirBytes(t, store); gone && after < before/10 {
			t.Logf("crictl rmi freed %d of the worker's %d store bytes", before-after, before)
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("a minute after crictl rmi the worker still lists the image (%v) or holds %d of %d store bytes", !gone, after, before)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// dirBytes is the size of the regular files under dir.
func dirBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	// The collector may be removing files meanwhile: a file gone is not
	// counted.
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		info, err := d.Info()
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err == nil {
			n += info.Size()
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestCRIPullSecrets is a Kubernetes pull with a pod's pull secret:
// crictl talks to the worker's CRI proxy (as kubelet would with its
// imageServiceEndpoint there) and passes --creds, as kubelet passes a pod's
// imagePullSecrets; the registry wants htpasswd credentials and the worker
// holds none. Without --creds crictl gets the registry's refusal; with
// them containerd pulls the manifest and config, the worker fetches the
// bundle with the pod's credentials (containerd downloads no layer blob),
// and the image runs. No secret reaches the worker's log. It runs against
// containerd 1.6 and containerd 2, on the same registry.
func TestCRIPullSecrets(t *testing.T) {
	requireRoot(t)
	crictl, err := exec.LookPath("crictl")
	if err != nil {
		t.Skip("SKIPPED: crictl is not installed (hack/install-deps.sh installs it)")
	}
	const user, password = "tenant-a", "pod-secret-5521"
	reg := harness.StartRegistry(t, harness.RegistryOptions{Htpasswd: map[string]string{user: password}})
	const repo, tag = "e2e/cri-secret", "v1"
	pushRunnable(t, reg, repo, tag, "hello with a pull secret\n")
	reg.WaitReady(t, repo, tag)
	ref := reg.Addr + "/" + repo + ":" + tag
	manifest, layers := pushedManifest(t, reg, repo, tag)
	for _, v := range harness.ContainerdVersions {
		t.Run(v.String(), func(t *testing.T) {
			criPullSecrets(t, v, crictl, reg, ref, manifest, layers, user, password)
		})
	}
}

func criPullSecrets(t *testing.T, v harness.ContainerdVersion, crictl string, reg *harness.Registry, ref, manifest string, layers []string, user, password string) {
	dir := harness.ShortTempDir(t, "cris-")
	snSock := filepath.Join(dir, "sn.sock")
	ctd := harness.StartContainerd(t, harness.ContainerdOptions{StarlightSocket: snSock, Namespace: "k8s.io", CRIRegistry: reg.Addr, Version: v})
	w := harness.StartWorker(t, harness.WorkerOptions{Registries: []string{reg.URL}, Containerd: ctd, Address: snSock})
	crictlPull := func(args ...string) (string, error) {
		args = append([]string{"--runtime-endpoint", "unix://" + ctd.Address, "--image-endpoint", "unix://" + w.CRIProxy,
			"--timeout", "5m", "pull"}, args...)
		out, err := exec.Command(crictl, append(args, ref)...).CombinedOutput()
		return string(out), err
	}

	// How each containerd reports the registry's 401 to CRI: 1.6 quotes
	// the status, 2 says no credentials answered the challenge.
	refusal := map[harness.ContainerdVersion]string{
		harness.Containerd16: "401 Unauthorized",
		harness.Containerd2:  "authorization failed: no basic auth credentials",
	}[v]
	out, err := crictlPull()
	t.Logf("crictl pull without credentials: %v: %s", err, strings.TrimSpace(out))
	if err == nil || !strings.Contains(out, refusal) {
		t.Fatalf("crictl pull without credentials: %v, want the registry's 401 (%q):\n%s", err, refusal, out)
	}

	timed(t, "crictl pull --creds through the CRI proxy", func() {
		if out, err := crictlPull("--creds", user+":"+password); err != nil {
			t.Fatalf("crictl pull --creds: %v\n%s", err, out)
		}
	})

	const ns = "k8s.io"
	content := ctd.CtrNS(t, ns, "content", "ls", "-q")
	mustContain(t, "containerd content", content, manifest)
	for i, l := range layers {
		if strings.Contains(content, l) {
			t.Errorf("containerd downloaded pushed layer %d (%s): the pull was not accelerated", i, l)
		}
	}
	run := ctd.CtrNS(t, ns, "run", "--rm", "--snapshotter", "starlight", ref, uniqueID("cris"), "cat", "/hello.txt")
	mustContain(t, "container of the CRI-pulled image", run, "hello with a pull secret")
	if got := waitComplete(t, w, ref, ns); !got.Complete {
		t.Errorf("worker's record of the CRI pull: %+v", got)
	}

	log, err := os.ReadFile(filepath.Join(w.Dir, "worker.log"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(log), password) || strings.Contains(string(log), base64.StdEncoding.EncodeToString([]byte(user+":"+password))) {
		t.Error("the pod's password is in the worker log")
	}
	mustContain(t, "worker log", string(log), `pull_credentials=true`)
}

// waitComplete waits for the worker's record of ref to be complete.
func waitComplete(t *testing.T, w *harness.Worker, ref, ns string) api.WorkerImage {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		got := w.Progress(t, ref, ns)
		if got.Complete || time.Now().After(deadline) {
			return got
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// pushedManifest returns the digest of the manifest pushed as repo:tag
// and its layer digests (asked with the registry's own credentials).
func pushedManifest(t *testing.T, reg *harness.Registry, repo, tag string) (string, []string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, reg.URL+"/v2/"+repo+"/manifests/"+tag, nil)
	req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json")
	resp, body, err := reg.Do(req, true)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("manifest of %s:%s: %s", repo, tag, resp.Status)
	}
	var m struct {
		Layers []struct {
			Digest string `json:"digest"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(body, &m); err != nil {
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

// TestCRIPod runs a Kubernetes pod the way kubelet does, through crictl:
// a pod sandbox (runp, host network: this machine has no CNI) whose
// sandbox image and container image both come through Starlight, a
// container created and started in it, and its log read back. It runs
// against containerd 1.6 and containerd 2, on the same registry.
func TestCRIPod(t *testing.T) {
	requireRoot(t)
	crictl, err := exec.LookPath("crictl")
	if err != nil {
		t.Skip("SKIPPED: crictl is not installed (hack/install-deps.sh installs it)")
	}
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	// The sandbox image containerd's CRI config names (see
	// harness.ContainerdOptions.CRIRegistry): busybox sleeping.
	busybox, diffID, err := harness.LayerBlob(harness.BusyboxLayer())
	if err != nil {
		t.Fatal(err)
	}
	pauseLayer := reg.PushBlob(t, "starlight-test/pause", busybox, harness.MediaTypeLayerGzip)
	reg.PushLayersCmd(t, "starlight-test/pause", "none", []harness.Descriptor{pauseLayer},
		[]string{diffID}, []string{"/bin/sleep", "1000000"})
	const repo, tag = "e2e/cri-pod", "v1"
	pushRunnable(t, reg, repo, tag, "hello from a pod\n")
	for _, r := range [][2]string{{"starlight-test/pause", "none"}, {repo, tag}} {
		reg.WaitReady(t, r[0], r[1])
	}
	ref := reg.Addr + "/" + repo + ":" + tag
	_, layers := pushedManifest(t, reg, repo, tag)
	layers = append(layers, pauseLayer.Digest)
	for _, v := range harness.ContainerdVersions {
		t.Run(v.String(), func(t *testing.T) { criPod(t, v, crictl, reg, ref, layers) })
	}
}

// criPod runs the pod of TestCRIPod on containerd version v; layers are
// the app's and the sandbox image's.
func criPod(t *testing.T, v harness.ContainerdVersion, crictl string, reg *harness.Registry, ref string, layers []string) {
	dir := harness.ShortTempDir(t, "pod-")
	snSock := filepath.Join(dir, "sn.sock")
	ctd := harness.StartContainerd(t, harness.ContainerdOptions{StarlightSocket: snSock, Namespace: "k8s.io", CRIRegistry: reg.Addr, Version: v})
	w := harness.StartWorker(t, harness.WorkerOptions{Registries: []string{reg.URL}, Containerd: ctd, Address: snSock})
	crictlDo := func(args ...string) string {
		t.Helper()
		args = append([]string{"--runtime-endpoint", "unix://" + ctd.Address, "--image-endpoint", "unix://" + w.CRIProxy, "--timeout", "2m"}, args...)
		out, err := exec.Command(crictl, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("crictl %s: %v\n%s", strings.Join(args[6:], " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}

	logs := filepath.Join(dir, "logs")
	podJSON := filepath.Join(dir, "pod.json")
	writeFile(t, podJSON, fmt.Sprintf(`{"metadata": {"name": "starlight-pod", "namespace": "default", "uid": "starlight-pod-uid", "attempt": 0},
 "log_directory": %q,
 "linux": {"security_context": {"namespace_options": {"network": 2}}}}`, logs), 0o644)
	ctrJSON := filepath.Join(dir, "container.json")
	writeFile(t, ctrJSON, fmt.Sprintf(`{"metadata": {"name": "app"}, "image": {"image": %q},
 "command": ["cat", "/hello.txt"], "log_path": "app.log", "linux": {}}`, ref), 0o644)

	crictlDo("pull", ref)
	pod := lastLine(crictlDo("runp", podJSON))
	t.Cleanup(func() {
		exec.Command(crictl, "--runtime-endpoint", "unix://"+ctd.Address, "stopp", pod).Run()
		exec.Command(crictl, "--runtime-endpoint", "unix://"+ctd.Address, "rmp", "-f", pod).Run()
	})
	id := lastLine(crictlDo("create", pod, ctrJSON, podJSON))
	crictlDo("start", id)
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(crictlDo("inspect", "-o", "go-template", "--template", "{{.status.state}}", id), "EXITED") {
		if time.Now().After(deadline) {
			t.Fatalf("the pod's container did not exit: %s", crictlDo("ps", "-a"))
		}
		time.Sleep(200 * time.Millisecond)
	}
	mustContain(t, "crictl logs", crictlDo("logs", id), "hello from a pod")

	// Both images came through Starlight: the worker pulled the app for
	// CRI, and containerd downloaded no layer blob, the sandbox image's
	// (busybox, which the app shares) included.
	if got := waitComplete(t, w, ref, "k8s.io"); !got.Complete {
		t.Errorf("worker's record of %s: %+v", ref, got)
	}
	content := ctd.CtrNS(t, "k8s.io", "content", "ls", "-q")
	for _, l := range layers {
		if strings.Contains(content, l) {
			t.Errorf("containerd downloaded layer %s", l)
		}
	}
}

// lastLine is the last line of crictl's output (warnings come first).
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}
