//go:build linux

package snapshotter

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/snapshots"
	"golang.org/x/sys/unix"
)

// mkdirAttrs makes a directory with an owner, mode and xattrs.
func mkdirAttrs(t *testing.T, p string, mode uint32, uid int, xattrs map[string]string) {
	t.Helper()
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(p, uid, uid); err != nil {
		t.Fatal(err)
	}
	for k, v := range xattrs {
		if err := unix.Lsetxattr(p, k, []byte(v), 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

// TestPlanChainFix checks what a chain fix corrects, as containerd's
// applier does it: a missing parent takes the attributes of the nearest
// lower directory at its path (not of a non-directory there), keeping a
// later declaration's owner and mode but adding the lower xattrs.
func TestPlanChainFix(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: chain fixes set owners and xattrs and need root")
	}
	view, lower, nearer := t.TempDir(), t.TempDir(), t.TempDir()
	mkdirAttrs(t, filepath.Join(view, "a"), 0o755, 0, nil)
	mkdirAttrs(t, filepath.Join(view, "b"), 0o700, 5, map[string]string{"user.y": "view"})
	mkdirAttrs(t, filepath.Join(view, "c"), 0o755, 0, nil)
	mkdirAttrs(t, filepath.Join(lower, "a"), 0o750, 1000, map[string]string{"user.x": "lower", "trusted.t": "no"})
	mkdirAttrs(t, filepath.Join(lower, "b"), 0o755, 1000, map[string]string{"user.x": "lower"})
	mkdirAttrs(t, filepath.Join(lower, "c"), 0o711, 7, nil)
	// The nearer layer has a file at c: the applier stops there.
	if err := os.WriteFile(filepath.Join(nearer, "c"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	deps := &ChainDeps{Implicit: []ImplicitDir{{Path: "a"}, {Path: "b", Declared: true}, {Path: "c"}}}
	p, err := planChainFix(view, deps, []chainLower{{dir: nearer}, {dir: lower}})
	if err != nil {
		t.Fatal(err)
	}
	if a := p.dirs["a"]; a == nil || a.mode != 0o750 || a.uid != 1000 || string(a.xattrs["user.x"]) != "lower" || a.xattrs["trusted.t"] != nil {
		t.Errorf("a: %+v", a)
	}
	if b := p.dirs["b"]; b == nil || b.mode != 0o700 || b.uid != 5 || len(b.xattrs) != 2 {
		t.Errorf("b: %+v", b)
	}
	if c, ok := p.dirs["c"]; ok {
		t.Errorf("c: %+v, want no fix", c)
	}

	// Written out, the fix has a and b, with those attributes.
	dst := filepath.Join(t.TempDir(), "fix")
	if err := p.write(dst, view); err != nil {
		t.Fatal(err)
	}
	got, err := readDirAttrs(filepath.Join(dst, "a"))
	if err != nil || !got.equal(p.dirs["a"]) {
		t.Errorf("written a: %+v, %v", got, err)
	}
}

// TestPlanChainFixBase: a base layer's whiteouts are hidden (their
// directory is merged) and what its unpacking removed gets a whiteout.
func TestPlanChainFixBase(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: chain fixes make whiteouts and need root")
	}
	view := t.TempDir()
	mkdirAttrs(t, filepath.Join(view, "d/gone"), 0o755, 0, nil)
	p, err := planChainFix(view, &ChainDeps{Whiteouts: []string{"w/x"}, BaseRemoved: []string{"d/gone"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := p.dirs["w"]; !ok || !slices.Equal(p.whiteouts, []string{"d/gone"}) {
		t.Errorf("plan: %+v", p)
	}
}

func TestBuildMountsWithDataLayers(t *testing.T) {
	o := &snapshotter{root: "/sn", options: []string{"index=off"}}
	m := o.buildMounts(snapshots.KindView, "1", lowerDirs{dirs: []string{"/l1"}, data: []string{"/store/content"}})
	if len(m) != 1 || m[0].Type != "overlay" {
		t.Fatalf("a view of one materialised layer: %+v, want overlay (a bind mount would show the metadata-only files)", m)
	}
	opts := strings.Join(m[0].Options, ",")
	if !strings.Contains(opts, "metacopy=on") || !strings.Contains(opts, "lowerdir=/l1::/store/content") {
		t.Errorf("options %s", opts)
	}
	m = o.buildMounts(snapshots.KindView, "1", lowerDirs{dirs: []string{"/l1"}})
	if m[0].Type != "bind" {
		t.Errorf("a view of one FUSE view: %+v, want a bind mount", m)
	}
}
