package fs

import (
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
