package fs

import (
	"fmt"
	"path"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/starlight-project/starlight/api"
)

// hiddenRoot are the eStargz metadata entries at the layer root. They are
// not part of the image: the overlayfs snapshotter never sees them either,
// because the eStargz-aware unpacker drops them.
var hiddenRoot = map[string]bool{
	"stargz.index.json":     true,
	".no.prefetch.landmark": true,
	".prefetch.landmark":    true,
}

// Overlay xattrs. A layer may not set trusted.overlay.* itself: those
// attributes steer overlayfs (redirects, metacopy), and only the opaque
// marker derived from a ".wh..wh..opq" entry is legitimate.
const (
	overlayXattrPrefix = "trusted.overlay."
	opaqueXattr        = "trusted.overlay.opaque"
)

// inode is one file of the layer view. Hard links share one inode.
type inode struct {
	ino      uint64
	typ      uint32 // syscall.S_IFREG, S_IFDIR, ...
	mode     uint32 // permission bits with setuid/setgid/sticky
	uid, gid uint32
	size     int64
	mtime    time.Time
	target   string // symlink target
	rdev     uint32
	xattrs   map[string][]byte
	digest   digest.Digest // regular files with size > 0
	nlink    uint32        // names (files) or 2 + subdirectories (dirs)
	name     string        // the first name it was given, for OnOpen

	children map[string]*inode // directories only
}

func (n *inode) isDir() bool { return n.typ == syscall.S_IFDIR }

// xattrNames returns the names of n's xattrs, sorted.
func (n *inode) xattrNames() []string {
	names := make([]string, 0, len(n.xattrs))
	for k := range n.xattrs {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}

func newDir(name string) *inode {
	return &inode{
		typ:      syscall.S_IFDIR,
		mode:     0o755,
		mtime:    time.Unix(0, 0),
		name:     name,
		children: make(map[string]*inode),
	}
}

// buildTree builds the view of one layer from its entries, applying the
// same rules as containerd's overlayfs applier: entries apply in order, a
// later entry replaces an earlier one of the same name (a directory over a
// directory only updates its metadata), missing parents are created 0755
// root:root, ".wh.NAME" becomes a 0:0 character device NAME and
// ".wh..wh..opq" marks its directory opaque.
func buildTree(entries []api.Entry) (*inode, error) {
	root := newDir("")
	root.nlink = 2
	for i := range entries {
		e := &entries[i]
		if err := e.Validate(); err != nil {
			return nil, fmt.Errorf("entry %d: %w", i, err)
		}
		if hiddenRoot[e.Name] {
			continue
		}
		dir, base := path.Split(e.Name)
		parent, err := mkdirAll(root, strings.TrimSuffix(dir, "/"))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", e.Name, err)
		}
		if base == api.WhiteoutOpaque {
			setXattr(parent, opaqueXattr, []byte("y"))
			continue
		}
		if strings.HasPrefix(base, api.WhiteoutPrefix) {
			hidden := strings.TrimPrefix(base, api.WhiteoutPrefix)
			if hidden == "" || hidden == "." || hidden == ".." {
				return nil, fmt.Errorf("%s: invalid whiteout", e.Name)
			}
			link(parent, hidden, &inode{
				typ:   syscall.S_IFCHR, // rdev 0:0, mode 0, as mknod(S_IFCHR, 0)
				uid:   uint32(e.UID),
				gid:   uint32(e.GID),
				mtime: e.ModTime,
				name:  path.Join(dir, hidden),
			})
			continue
		}
		if e.Type == api.TypeHardlink {
			target, err := lookup(root, e.LinkName)
			if err != nil {
				return nil, fmt.Errorf("%s: hard link target %s: %w", e.Name, e.LinkName, err)
			}
			if target.isDir() {
				return nil, fmt.Errorf("%s: hard link to directory %s", e.Name, e.LinkName)
			}
			if parent.children[base] != target {
				link(parent, base, target)
			}
			continue
		}
		n, err := newInode(e)
		if err != nil {
			return nil, err
		}
		if old := parent.children[base]; old != nil && old.isDir() && n.isDir() {
			// Like tar extraction over an existing directory: its
			// metadata changes, its contents (and an opaque marker
			// already applied) stay.
			old.mode, old.uid, old.gid, old.mtime = n.mode, n.uid, n.gid, n.mtime
			for k, v := range n.xattrs {
				setXattr(old, k, v)
			}
			continue
		}
		link(parent, base, n)
	}
	assignInodes(root)
	return root, nil
}

func newInode(e *api.Entry) (*inode, error) {
	n := &inode{
		mode:  e.Mode & 0o7777,
		uid:   uint32(e.UID),
		gid:   uint32(e.GID),
		mtime: e.ModTime,
		name:  e.Name,
	}
	for k, v := range e.Xattrs {
		if strings.HasPrefix(k, overlayXattrPrefix) {
			continue
		}
		setXattr(n, k, v)
	}
	switch e.Type {
	case api.TypeReg:
		n.typ = syscall.S_IFREG
		n.size = e.Size
		if e.Size > 0 {
			d, err := api.ParseDigest(e.Digest)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", e.Name, err)
			}
			n.digest = d
		}
	case api.TypeDir:
		n.typ = syscall.S_IFDIR
		n.size = 4096
		n.children = make(map[string]*inode)
	case api.TypeSymlink:
		n.typ = syscall.S_IFLNK
		n.target = e.LinkName
		n.size = int64(len(e.LinkName))
	case api.TypeChar, api.TypeBlock:
		n.typ = syscall.S_IFCHR
		if e.Type == api.TypeBlock {
			n.typ = syscall.S_IFBLK
		}
		if e.DevMajor < 0 || e.DevMajor > 0xfff || e.DevMinor < 0 || e.DevMinor > 0xfffff {
			return nil, fmt.Errorf("%s: device number %d:%d out of range", e.Name, e.DevMajor, e.DevMinor)
		}
		// FUSE carries rdev in the kernel's 32-bit encoding, which is
		// the low half of glibc's makedev for these ranges.
		n.rdev = uint32(unix.Mkdev(uint32(e.DevMajor), uint32(e.DevMinor)))
	case api.TypeFifo:
		n.typ = syscall.S_IFIFO
	default:
		return nil, fmt.Errorf("%s: unsupported type %q", e.Name, e.Type)
	}
	return n, nil
}

func setXattr(n *inode, k string, v []byte) {
	if n.xattrs == nil {
		n.xattrs = make(map[string][]byte)
	}
	n.xattrs[k] = append([]byte(nil), v...)
}

// mkdirAll returns the directory dir, creating missing ones.
func mkdirAll(root *inode, dir string) (*inode, error) {
	cur := root
	if dir == "" {
		return cur, nil
	}
	for i, el := range strings.Split(dir, "/") {
		next := cur.children[el]
		if next == nil {
			next = newDir(strings.Join(strings.Split(dir, "/")[:i+1], "/"))
			link(cur, el, next)
		} else if !next.isDir() {
			return nil, fmt.Errorf("parent %s is not a directory", next.name)
		}
		cur = next
	}
	return cur, nil
}

func lookup(root *inode, name string) (*inode, error) {
	cur := root
	for _, el := range strings.Split(name, "/") {
		if !cur.isDir() {
			return nil, fmt.Errorf("not found")
		}
		cur = cur.children[el]
		if cur == nil {
			return nil, fmt.Errorf("not found")
		}
	}
	return cur, nil
}

// link names n base in parent, replacing what had that name.
func link(parent *inode, base string, n *inode) {
	if old := parent.children[base]; old != nil {
		unlink(parent, old)
	}
	parent.children[base] = n
	n.nlink++
	if n.isDir() {
		n.nlink++ // its "."
		parent.nlink++
	}
}

// unlink drops one name of n (and, for a directory, everything in it).
func unlink(parent, n *inode) {
	n.nlink--
	if n.isDir() {
		parent.nlink--
		for _, c := range n.children {
			unlink(n, c)
		}
	}
}

// assignInodes numbers the inodes in a deterministic walk (sorted names),
// root first as 1; hard links keep one number.
func assignInodes(root *inode) {
	next := uint64(1)
	var walk func(n *inode)
	walk = func(n *inode) {
		if n.ino != 0 {
			return
		}
		n.ino = next
		next++
		names := make([]string, 0, len(n.children))
		for k := range n.children {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			walk(n.children[k])
		}
	}
	walk(root)
}
