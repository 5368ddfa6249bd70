package fs

import (
	"fmt"
	"syscall"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

func reg(name string) api.Entry {
	return api.Entry{Name: name, Type: api.TypeReg, Mode: 0o644}
}

func dir(name string, mode uint32) api.Entry {
	return api.Entry{Name: name, Type: api.TypeDir, Mode: mode}
}

func TestBuildTree(t *testing.T) {
	withContent := reg("b")
	withContent.Size = 1
	withContent.Digest = digest.FromString("x").String()
	withContent.Chunks = []api.Chunk{{Size: 1, Digest: withContent.Digest}}

	tests := []struct {
		name    string
		entries []api.Entry
		check   func(t *testing.T, root *inode)
		wantErr bool
	}{{
		name:    "implicit parents",
		entries: []api.Entry{reg("a/b/c")},
		check: func(t *testing.T, root *inode) {
			a := mustLookup(t, root, "a")
			if !a.isDir() || a.mode != 0o755 || a.uid != 0 || a.nlink != 3 {
				t.Errorf("implicit dir a: %+v", a)
			}
			if root.nlink != 3 {
				t.Errorf("root nlink %d, want 3", root.nlink)
			}
		},
	}, {
		name:    "later entry replaces earlier",
		entries: []api.Entry{reg("a"), {Name: "a", Type: api.TypeSymlink, LinkName: "b"}},
		check: func(t *testing.T, root *inode) {
			if a := mustLookup(t, root, "a"); a.typ != syscall.S_IFLNK || a.target != "b" {
				t.Errorf("a: %+v", a)
			}
		},
	}, {
		name:    "directory over directory keeps contents",
		entries: []api.Entry{dir("d", 0o700), reg("d/f"), dir("d", 0o750)},
		check: func(t *testing.T, root *inode) {
			if d := mustLookup(t, root, "d"); d.mode != 0o750 {
				t.Errorf("d mode %o", d.mode)
			}
			mustLookup(t, root, "d/f")
		},
	}, {
		name:    "file over directory drops its contents",
		entries: []api.Entry{dir("d", 0o755), dir("d/e", 0o755), reg("d")},
		check: func(t *testing.T, root *inode) {
			if d := mustLookup(t, root, "d"); d.typ != syscall.S_IFREG {
				t.Errorf("d: %+v", d)
			}
			if root.nlink != 2 {
				t.Errorf("root nlink %d, want 2", root.nlink)
			}
		},
	}, {
		name: "hard links share an inode",
		entries: []api.Entry{withContent,
			{Name: "h1", Type: api.TypeHardlink, LinkName: "b"},
			{Name: "d/h2", Type: api.TypeHardlink, LinkName: "b"},
		},
		check: func(t *testing.T, root *inode) {
			b, h1, h2 := mustLookup(t, root, "b"), mustLookup(t, root, "h1"), mustLookup(t, root, "d/h2")
			if b != h1 || b != h2 || b.nlink != 3 || b.ino == 0 {
				t.Errorf("hard links: %p %p %p nlink %d", b, h1, h2, b.nlink)
			}
		},
	}, {
		name:    "replacing a hard linked name",
		entries: []api.Entry{reg("a"), {Name: "b", Type: api.TypeHardlink, LinkName: "a"}, reg("a")},
		check: func(t *testing.T, root *inode) {
			a, b := mustLookup(t, root, "a"), mustLookup(t, root, "b")
			if a == b || a.nlink != 1 || b.nlink != 1 {
				t.Errorf("a nlink %d, b nlink %d", a.nlink, b.nlink)
			}
		},
	}, {
		name:    "whiteouts",
		entries: []api.Entry{dir("d", 0o755), {Name: "d/.wh.x", Type: api.TypeReg, UID: 5, GID: 6}, reg("d/.wh..wh..opq")},
		check: func(t *testing.T, root *inode) {
			d := mustLookup(t, root, "d")
			if string(d.xattrs[opaqueXattr]) != "y" {
				t.Errorf("d not opaque: %v", d.xattrs)
			}
			x := mustLookup(t, root, "d/x")
			if x.typ != syscall.S_IFCHR || x.rdev != 0 || x.mode != 0 || x.uid != 5 || x.gid != 6 {
				t.Errorf("whiteout: %+v", x)
			}
			if len(d.children) != 1 {
				t.Errorf("d children: %v", d.children)
			}
		},
	}, {
		name: "hidden eStargz entries at the root only",
		entries: []api.Entry{reg("stargz.index.json"), reg(".prefetch.landmark"), reg(".no.prefetch.landmark"),
			reg("sub/stargz.index.json")},
		check: func(t *testing.T, root *inode) {
			if len(root.children) != 1 {
				t.Errorf("root children: %v", root.children)
			}
			mustLookup(t, root, "sub/stargz.index.json")
		},
	}, {
		name: "layers cannot set overlay xattrs",
		entries: []api.Entry{{Name: "f", Type: api.TypeReg, Xattrs: map[string][]byte{
			"trusted.overlay.redirect": []byte("/etc"), "security.capability": {1},
		}}},
		check: func(t *testing.T, root *inode) {
			f := mustLookup(t, root, "f")
			if len(f.xattrs) != 1 || f.xattrs["security.capability"] == nil {
				t.Errorf("xattrs: %v", f.xattrs)
			}
		},
	}, {
		// containerd's applier chowns and chmods the linked path: the
		// shared inode takes the link's header, the last one wins.
		name: "hard link headers apply to the inode",
		entries: []api.Entry{
			{Name: "data/hello.txt", Type: api.TypeReg, Mode: 0o640, UID: 1000, GID: 1000},
			{Name: "data/hello-hard", Type: api.TypeHardlink, LinkName: "data/hello.txt", Mode: 0o644,
				Xattrs: map[string][]byte{"user.a": []byte("1")}},
			{Name: "data/again", Type: api.TypeHardlink, LinkName: "data/hello-hard", Mode: 0o4755, UID: 5, GID: 6},
		},
		check: func(t *testing.T, root *inode) {
			f := mustLookup(t, root, "data/hello.txt")
			if f != mustLookup(t, root, "data/again") || f.mode != 0o4755 || f.uid != 5 || f.gid != 6 || string(f.xattrs["user.a"]) != "1" {
				t.Errorf("linked inode: %+v", f)
			}
		},
	}, {
		name: "a hard link to a symlink leaves its mode",
		entries: []api.Entry{
			{Name: "s", Type: api.TypeSymlink, LinkName: "x", Mode: 0o644},
			{Name: "l", Type: api.TypeHardlink, LinkName: "s", Mode: 0o600, UID: 3},
		},
		check: func(t *testing.T, root *inode) {
			if s := mustLookup(t, root, "l"); s.mode != 0o777 || s.uid != 3 {
				t.Errorf("symlink: %+v", s)
			}
		},
	}, {
		name: "xattrs containerd's applier refuses",
		entries: []api.Entry{
			{Name: "f", Type: api.TypeReg, Xattrs: map[string][]byte{"trusted.x": {1}, "user.x": {2}}},
			{Name: "s", Type: api.TypeSymlink, LinkName: "f", Xattrs: map[string][]byte{"user.x": {2}, "security.x": {3}}},
		},
		check: func(t *testing.T, root *inode) {
			if f := mustLookup(t, root, "f"); len(f.xattrs) != 1 || f.xattrs["user.x"] == nil {
				t.Errorf("file xattrs: %v", f.xattrs)
			}
			if s := mustLookup(t, root, "s"); len(s.xattrs) != 1 || s.xattrs["security.x"] == nil {
				t.Errorf("symlink xattrs: %v", s.xattrs)
			}
		},
	}, {
		name:    "a missing parent in a setgid directory takes its group",
		entries: []api.Entry{{Name: "d", Type: api.TypeDir, Mode: 0o2775, GID: 50}, reg("d/e/f")},
		check: func(t *testing.T, root *inode) {
			if e := mustLookup(t, root, "d/e"); e.gid != 50 || e.mode != 0o755 || !e.implicit {
				t.Errorf("d/e: %+v", e)
			}
		},
	}, {
		name:    "hard link to a missing target",
		entries: []api.Entry{{Name: "h", Type: api.TypeHardlink, LinkName: "nope"}},
		wantErr: true,
	}, {
		name:    "hard link to a directory",
		entries: []api.Entry{dir("d", 0o755), {Name: "h", Type: api.TypeHardlink, LinkName: "d"}},
		wantErr: true,
	}, {
		name:    "path escape",
		entries: []api.Entry{reg("../x")},
		wantErr: true,
	}, {
		name:    "parent is a file",
		entries: []api.Entry{reg("f"), reg("f/g")},
		wantErr: true,
	}, {
		name:    "unknown type",
		entries: []api.Entry{{Name: "x", Type: "socket"}},
		wantErr: true,
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root, err := buildTree(tt.entries)
			if tt.wantErr {
				if err == nil {
					t.Fatal("no error")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, root)
		})
	}
}

func mustLookup(t *testing.T, root *inode, name string) *inode {
	t.Helper()
	n, err := lookup(root, name)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return n
}

func TestLayerChainDeps(t *testing.T) {
	tests := []struct {
		name    string
		entries []api.Entry
		want    ChainDeps
	}{{
		name:    "declared parents",
		entries: []api.Entry{dir("a", 0o750), reg("a/f")},
	}, {
		// The case: data/ comes from the lower layer.
		name:    "implicit parents",
		entries: []api.Entry{reg("data/hello.txt"), reg("data/sub/x"), dir("data/sub", 0o700)},
		want: ChainDeps{Implicit: []ImplicitDir{
			{Path: "data"}, {Path: "data/sub", Declared: true, ChainParent: true},
		}},
	}, {
		name:    "whiteouts",
		entries: []api.Entry{dir("a", 0o755), reg("a/.wh.x")},
		want:    ChainDeps{Whiteouts: []string{"a/x"}},
	}, {
		// Without parents, the marker removes the missing parent b, made
		// before it, but keeps what entries created.
		name:    "opaque marker after a missing parent",
		entries: []api.Entry{dir("a", 0o755), reg("a/b/c"), reg("a/f"), reg("a/.wh..wh..opq"), reg("a/g")},
		want:    ChainDeps{Implicit: []ImplicitDir{{Path: "a/b"}}, BaseRemoved: []string{"a/b"}},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := LayerChainDeps(tt.entries)
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(*got) != fmt.Sprint(tt.want) {
				t.Errorf("got %+v, want %+v", *got, tt.want)
			}
		})
	}
}
