package harness_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/starlight-project/starlight/integration/harness"
)

func TestMain(m *testing.M) { os.Exit(harness.Main(m)) }

func requireRoot(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("daemon test skipped in -short mode")
	}
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: THIS TEST REQUIRES ROOT (containerd, dockerd)")
	}
}

// TestCompareTrees checks that the comparator sees each kind of difference.
func TestCompareTrees(t *testing.T) {
	mk := func(t *testing.T) string {
		d := t.TempDir()
		must(t, os.WriteFile(filepath.Join(d, "a"), []byte("a"), 0o644))
		must(t, os.Link(filepath.Join(d, "a"), filepath.Join(d, "a2")))
		must(t, os.Symlink("a", filepath.Join(d, "l")))
		must(t, os.Mkdir(filepath.Join(d, "dir"), 0o755))
		must(t, os.WriteFile(filepath.Join(d, "stargz.index.json"), []byte("{}"), 0o644))
		return d
	}
	tests := []struct {
		name   string
		change func(t *testing.T, d string)
		want   string // substring of the diff; "" for no diff
	}{
		{"equal", func(*testing.T, string) {}, ""},
		{"content", func(t *testing.T, d string) { must(t, os.WriteFile(filepath.Join(d, "a"), []byte("b"), 0o644)) }, "sha256"},
		{"mode", func(t *testing.T, d string) { must(t, os.Chmod(filepath.Join(d, "dir"), 0o4755|os.ModeSetuid)) }, "/dir: mode"},
		{"link target", func(t *testing.T, d string) {
			must(t, os.Remove(filepath.Join(d, "l")))
			must(t, os.Symlink("a2", filepath.Join(d, "l")))
		}, "/l: link"},
		{"hard link broken", func(t *testing.T, d string) {
			must(t, os.Remove(filepath.Join(d, "a2")))
			must(t, os.WriteFile(filepath.Join(d, "a2"), []byte("a"), 0o644))
		}, "hardlinks"},
		{"extra file", func(t *testing.T, d string) { must(t, os.WriteFile(filepath.Join(d, "dir", "x"), nil, 0o644)) }, "only in B: /dir/x"},
		{"xattr", func(t *testing.T, d string) { must(t, unix.Lsetxattr(filepath.Join(d, "a"), "user.k", []byte("v"), 0)) }, "xattr user.k"},
		{"ignored root file", func(t *testing.T, d string) { must(t, os.Remove(filepath.Join(d, "stargz.index.json"))) }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b := mk(t), mk(t)
			tt.change(t, b)
			diff, err := harness.CompareTrees(a, b, harness.CompareOptions{IgnoreRoot: harness.EStargzRootFiles})
			if err != nil {
				t.Fatal(err)
			}
			if tt.want == "" && diff != "" {
				t.Errorf("unexpected diff:\n%s", diff)
			}
			if tt.want != "" && !strings.Contains(diff, tt.want) {
				t.Errorf("diff lacks %q:\n%s", tt.want, diff)
			}
		})
	}
}

// TestTrickyImageRuns checks the generated image and the daemon helpers
// without Starlight: docker loads the archive, containerd imports it and
// runs it on overlayfs, and the rootfs has what the spec says.
func TestTrickyImageRuns(t *testing.T) {
	requireRoot(t)
	spec := harness.TrickyImage("starlight-test/selftest:v1")
	img := harness.BuildImage(t, spec)

	d := harness.SharedDockerd(t)
	out := d.Docker(t, "load", "-i", img.Archive)
	if !strings.Contains(out, spec.Name) {
		t.Errorf("docker load: %s", out)
	}

	c := harness.StartContainerd(t, harness.ContainerdOptions{})
	c.Ctr(t, "images", "import", "--snapshotter", "overlayfs", img.Archive)
	ref := "docker.io/" + spec.Name
	out = c.Ctr(t, "run", "--rm", "--snapshotter", "overlayfs", ref, "selftest", "/bin/sh", "-c",
		"cat /data/hello.txt; stat -c '%n %A %u:%g' /data/setuid /data/owned; test -e /data/todelete || echo gone; ls /opq")
	for _, want := range []string{"hello again from layer 3", "/data/setuid -rwsr-xr-x 0:0", "/data/owned -rw-r----- 1000:1001", "gone", "new"} {
		if !strings.Contains(out, want) {
			t.Errorf("container output lacks %q:\n%s", want, out)
		}
	}
	mnt := c.MountImage(t, c.Namespace, "overlayfs", ref)
	tree, err := harness.ScanTree(mnt, harness.CompareOptions{})
	if err != nil {
		t.Fatal(err)
	}
	checks := map[string]func(*harness.FileInfo) bool{
		"/data/caps": func(f *harness.FileInfo) bool {
			return f.Xattrs["user.starlight"] == "hello-xattr" && f.Xattrs["security.capability"] != ""
		},
		"/data/hl-a":     func(f *harness.FileInfo) bool { return strings.Join(f.HardLinks, ",") == "/data/hl-b,/data/sub/hl-c" },
		"/data/chardev":  func(f *harness.FileInfo) bool { return f.Type == "char" && f.Major == 1 && f.Minor == 3 },
		"/data/blockdev": func(f *harness.FileInfo) bool { return f.Type == "block" && f.Major == 7 },
		"/data/fifo":     func(f *harness.FileInfo) bool { return f.Type == "fifo" },
		"/data/sticky":   func(f *harness.FileInfo) bool { return f.Mode == 0o1777 },
		"/data/big":      func(f *harness.FileInfo) bool { return f.Size == 6<<20 },
		"/many/f199":     func(f *harness.FileInfo) bool { return f.Type == "reg" },
	}
	for p, ok := range checks {
		f := tree[p]
		if f == nil || !ok(f) {
			t.Errorf("%s: %+v", p, f)
		}
	}
	for _, gone := range []string{"/data/todelete", "/data/dir-todelete", "/opq/a", "/opq/sub"} {
		if tree[gone] != nil {
			t.Errorf("%s should be whited out", gone)
		}
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
