package integration

import (
	"archive/tar"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/starlight-project/starlight/integration/harness"
)

// TestRootfsEqualsOverlayfs pushes the image of issue 11 with docker (a
// hard link whose own header has another owner and mode than its target,
// data/ declared again by the next layer, whiteouts in it), pulls it with
// containerd's overlayfs snapshotter and with Starlight, and compares the
// two rootfs file by file once the layers are complete, when Starlight
// serves them materialised, without FUSE. (integration/rootfs compares
// random stacks in every state; this is the real path, docker to runc.)
func TestRootfsEqualsOverlayfs(t *testing.T) {
	requireRoot(t)
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	docker := harness.SharedDockerd(t)
	data := harness.Entry{Name: "/data", Type: tar.TypeDir, Mode: 0o750, UID: 1000, GID: 1000}
	spec := harness.ImageSpec{Name: "starlight-test/rootfs:v1", Cmd: []string{"/bin/sh"}, Layers: []harness.Layer{
		harness.BusyboxLayer(),
		{
			data,
			{Name: "/data/hello.txt", Mode: 0o640, UID: 1000, GID: 1000, Content: []byte("hello\n")},
			{Name: "/data/hello-hard", Type: tar.TypeLink, LinkName: "/data/hello.txt", Mode: 0o644},
			{Name: "/data/gone", Content: []byte("gone\n")},
			{Name: "/data/gone-hard", Type: tar.TypeLink, LinkName: "/data/gone", Mode: 0o600, UID: 7},
		},
		{
			data,
			{Name: "/data/hello.txt", Mode: 0o640, UID: 1000, GID: 1000, Content: []byte("hello again\n")},
			{Name: "/data/.wh.gone"},
			{Name: "/data/other", Content: []byte("other\n")},
		},
	}}
	img := harness.BuildImage(t, spec)
	const repo, tag = "e2e/rootfs", "v1"
	ref := reg.Addr + "/" + repo + ":" + tag
	docker.Push(t, img, ref)
	reg.WaitReady(t, repo, tag)

	node := harness.StartNode(t, reg.URL)
	ctd, w := node.Containerd, node.Worker
	w.CLI(t, "sl", "pull", "--plain-http", ref)
	ctd.CtrNS(t, "plain", "images", "pull", "--plain-http", ref)
	for deadline := time.Now().Add(2 * time.Minute); !w.Progress(t, ref, "sl").Complete; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the pull does not complete: %+v", w.Progress(t, ref, "sl"))
		}
	}

	a := ctd.MountImage(t, "plain", "overlayfs", ref)
	b := ctd.MountImage(t, "sl", "starlight", ref)
	if opts := mountOptions(t, b); !strings.Contains(opts, "metacopy=on") {
		t.Errorf("the rootfs of a complete image is mounted with %q: want its layers materialised, over the store", opts)
	}
	diff, err := harness.CompareTrees(a, b, harness.CompareOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if diff != "" {
		t.Errorf("starlight rootfs differs from overlayfs (A=overlayfs, B=starlight):\n%s", diff)
	}
	out := ctd.CtrNS(t, "sl", "run", "--rm", "--snapshotter", "starlight", ref, uniqueID("rootfs"),
		"/bin/sh", "-c", "stat -c '%n %a %u:%g' /data /data/hello-hard /data/gone-hard; cat /data/hello.txt /data/hello-hard")
	mustContain(t, "starlight run", out, "/data 750 1000:1000", "/data/hello-hard 644 0:0", "/data/gone-hard 600 7:0", "hello again", "hello\n")
}

// mountOptions returns the superblock options of the mount at target.
func mountOptions(t *testing.T, target string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[4] == target {
			return f[len(f)-1]
		}
	}
	t.Fatalf("%s is not mounted", target)
	return ""
}
