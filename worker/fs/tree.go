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

// opaqueXattr marks an opaque directory for overlayfs. A layer may not set
// trusted.overlay.* itself (keepXattr): those attributes steer overlayfs
// (redirects, metacopy), and only the opaque marker derived from a
// ".wh..wh..opq" entry is legitimate.
const opaqueXattr = "trusted.overlay.opaque"

// keepXattr applies containerd's applier's rules for an xattr of a layer
// entry (archive.createTarFile): trusted.* attributes are refused (that
// covers trusted.overlay.*), and user.* ones are dropped on anything but
// regular files and directories, where the kernel refuses them (EPERM).
func keepXattr(typ uint32, key string) bool {
	if strings.HasPrefix(key, "trusted.") {
		return false
	}
	if strings.HasPrefix(key, "user.") && typ != syscall.S_IFREG && typ != syscall.S_IFDIR {
		return false
	}
	return true
}

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

	// implicit marks a directory no entry created: a parent of an entry,
	// made by the applier. declared marks an implicit directory that a
	// later entry of the layer declared after all (see ImplicitDirs).
	implicit, declared bool
	// chainParent marks an implicit directory made while its parent
	// was implicit and not declared yet.
	chainParent bool
	// whiteout marks the character device of a ".wh.NAME" entry.
	whiteout bool

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
// same rules as containerd's overlayfs applier (archive.Apply with
// OverlayConvertWhiteout): entries apply in order, a later entry replaces
// an earlier one of the same name (a directory over a directory only
// updates its metadata and adds its xattrs), missing parents are created
// 0755 root:root, ".wh.NAME" becomes a 0:0 character device NAME owned as
// its header says and ".wh..wh..opq" marks its directory opaque. A hard
// link names its target's inode and then applies its own header to it
// (owner, mode, xattrs, mtime), as the applier's chown and chmod of the
// linked path do: the last header wins. Symlinks are 0777, whatever
// their header says (the applier's lchmod skips them).
//
// A missing parent whose directory exists in a lower layer takes that
// directory's attributes in containerd's applier (archive.WithParents);
// a layer's view cannot know its lower layers, so such directories are
// marked implicit and the snapshotter corrects them (ImplicitDirs).
func buildTree(entries []api.Entry) (*inode, error) {
	return applyEntries(entries, false)
}

// applyEntries builds the tree of a layer. With noParents, it applies the rules
// containerd's applier follows for a layer that has no parent, which it
// unpacks without overlayfs' whiteout conversion: ".wh.NAME" removes NAME
// (nothing is created), and the first ".wh..wh..opq" of a directory
// removes what is in it that no entry of the layer created so far (the
// missing parents the applier made), with their contents.
func applyEntries(entries []api.Entry, noParents bool) (*inode, error) {
	root := newDir("")
	root.nlink = 2
	// unpacked and opaqued track, without parents, the paths entries
	// created and the directories whose opaque marker was applied.
	var unpacked, opaqued map[string]bool
	if noParents {
		unpacked, opaqued = map[string]bool{}, map[string]bool{}
	}
	for i := range entries {
		e := &entries[i]
		if err := e.Validate(); err != nil {
			return nil, fmt.Errorf("entry %d: %w", i, err)
		}
		if hiddenRoot[e.Name] {
			continue
		}
		dir, base := path.Split(e.Name)
		dir = strings.TrimSuffix(dir, "/")
		parent, err := mkdirAll(root, dir)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", e.Name, err)
		}
		if base == api.WhiteoutOpaque {
			if unpacked == nil {
				setXattr(parent, opaqueXattr, []byte("y"))
			} else if !opaqued[dir] {
				opaqued[dir] = true
				removeUnpacked(parent, dir, unpacked)
			}
			continue
		}
		if strings.HasPrefix(base, api.WhiteoutPrefix) {
			hidden := strings.TrimPrefix(base, api.WhiteoutPrefix)
			if hidden == "" || hidden == "." || hidden == ".." {
				return nil, fmt.Errorf("%s: invalid whiteout", e.Name)
			}
			if unpacked != nil {
				if old := parent.children[hidden]; old != nil {
					unlink(parent, old)
					delete(parent.children, hidden)
				}
				continue
			}
			link(parent, hidden, &inode{
				typ:      syscall.S_IFCHR, // rdev 0:0, mode 0, as mknod(S_IFCHR, 0)
				uid:      uint32(e.UID),
				gid:      uint32(e.GID),
				mtime:    e.ModTime,
				name:     path.Join(dir, hidden),
				whiteout: true,
			})
			continue
		}
		if unpacked != nil {
			unpacked[e.Name] = true
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
			applyLinkHeader(target, e)
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
			old.declared = true
			continue
		}
		link(parent, base, n)
	}
	assignInodes(root)
	return root, nil
}

// removeUnpacked removes from dir (at path p) what the entries applied so
// far did not create, as containerd's applier handles an opaque marker in
// a layer without parents.
func removeUnpacked(dir *inode, p string, unpacked map[string]bool) {
	for name, c := range dir.children {
		cp := path.Join(p, name)
		if !unpacked[cp] {
			unlink(dir, c)
			delete(dir.children, name)
		} else if c.isDir() {
			removeUnpacked(c, cp, unpacked)
		}
	}
}

// applyLinkHeader gives the inode a hard link names the metadata of the
// link's own header, as containerd's applier does after os.Link: Lchown,
// the header's xattrs, then lchmod, which leaves a symlink alone, and
// the mtime.
func applyLinkHeader(n *inode, e *api.Entry) {
	n.uid, n.gid, n.mtime = uint32(e.UID), uint32(e.GID), e.ModTime
	for k, v := range e.Xattrs {
		if keepXattr(n.typ, k) {
			setXattr(n, k, v)
		}
	}
	if n.typ != syscall.S_IFLNK {
		n.mode = e.Mode & 0o7777
	}
}

func newInode(e *api.Entry) (*inode, error) {
	n := &inode{
		mode:  e.Mode & 0o7777,
		uid:   uint32(e.UID),
		gid:   uint32(e.GID),
		mtime: e.ModTime,
		name:  e.Name,
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
		n.mode = 0o777 // os.Symlink's; no chmod reaches a symlink
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
	for k, v := range e.Xattrs {
		if keepXattr(n.typ, k) {
			setXattr(n, k, v)
		}
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
			next.implicit = true
			// mkdir in a setgid directory gives the new one its group.
			if cur.mode&syscall.S_ISGID != 0 {
				next.gid = cur.gid
			}
			// Whose attributes the parent has now: an implicit one
			// takes them from the chain (ImplicitDir.ChainParent).
			next.chainParent = cur.implicit && !cur.declared
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

// ImplicitDir is a directory of a layer's view that the layer's entries
// did not create before their contents: containerd's applier made it as a
// missing parent.
type ImplicitDir struct {
	Path string
	// Declared reports that an entry of the layer declared the directory
	// afterwards: its owner, mode and mtime are the entry's, and the
	// entry's xattrs were added to those the applier had copied.
	Declared bool
	// ChainParent reports that the directory was made while its parent
	// was itself implicit and undeclared. A directory made in a setgid
	// directory takes that directory's group, so when nothing is copied
	// to it, its group is that of its parent as the chain makes it (the
	// view knows the parents it declared).
	ChainParent bool
}

// ChainDeps is what containerd's unpacking of a layer takes from the layers
// below it, which the layer's view, built from the layer alone, cannot
// know. The snapshotter corrects the view for its place in each chain.
type ChainDeps struct {
	// Implicit lists the view's implicit directories, parents first:
	// containerd's applier (archive.WithParents) gives such a directory
	// the owner, mode, mtime and non-trusted xattrs of the same directory
	// in the nearest lower layer that has something at that path (0755
	// root:root when that is not a directory, or when no lower layer has
	// the path).
	Implicit []ImplicitDir
	// Whiteouts lists the view's whiteouts. A layer without parents is
	// unpacked without whiteout conversion: it has none, and overlayfs
	// lists the whiteouts of a directory that only one layer has.
	Whiteouts []string
	// BaseRemoved lists what the view has but the layer's unpacking
	// without parents removes: the missing parents its opaque markers
	// find (see applyEntries), with their contents.
	BaseRemoved []string
}

// Empty reports whether the layer's unpacking does not depend on its
// parents.
func (d *ChainDeps) Empty() bool {
	return len(d.Implicit) == 0 && len(d.Whiteouts) == 0 && len(d.BaseRemoved) == 0
}

// LayerChainDeps returns the ChainDeps of a layer's entries.
func LayerChainDeps(entries []api.Entry) (*ChainDeps, error) {
	view, err := applyEntries(entries, false)
	if err != nil {
		return nil, err
	}
	// A layer containerd cannot unpack without parents (a hard link to
	// what an opaque marker removed) is served as it is at any place.
	base, err := applyEntries(entries, true)
	if err != nil {
		base = nil
	}
	d := &ChainDeps{}
	// b is the same directory without parents; nil under something
	// that unpacking removes, or when the layer cannot be unpacked so.
	var walk func(n, b *inode, prefix string, removed bool)
	walk = func(n, b *inode, prefix string, removed bool) {
		names := make([]string, 0, len(n.children))
		for k := range n.children {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			c, p := n.children[k], prefix+k
			var bc *inode
			if b != nil {
				bc = b.children[k]
			}
			if c.whiteout {
				if !removed {
					d.Whiteouts = append(d.Whiteouts, p)
				}
				continue
			}
			cremoved := removed
			if b != nil && bc == nil {
				d.BaseRemoved = append(d.BaseRemoved, p)
				cremoved = true
			}
			if c.isDir() {
				if c.implicit {
					d.Implicit = append(d.Implicit, ImplicitDir{Path: p, Declared: c.declared, ChainParent: c.chainParent})
				}
				if bc != nil && !bc.isDir() {
					bc = nil
				}
				walk(c, bc, p+"/", cremoved)
			}
		}
	}
	walk(view, base, "", false)
	return d, nil
}
