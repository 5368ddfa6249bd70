package fs

import (
	"sort"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// OpenDir lets the kernel cache directory listings (FOPEN_CACHE_DIR) and
// keep them across opens (FOPEN_KEEP_CACHE): a layer never changes, and
// overlayfs reads every lower directory of a merged one on each readdir, so
// without the cache a metadata walk (`find /`) crosses into this process
// once per directory and layer, every time. The handle carries nothing:
// listings are computed from the tree (listing), so a handle given out by
// an earlier process reads the same.
func (l *layerFS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	n := l.node(in.NodeId)
	if n == nil {
		return fuse.Status(syscall.ESTALE)
	}
	if !n.isDir() {
		return fuse.Status(syscall.ENOTDIR)
	}
	out.OpenFlags = fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE
	return fuse.OK
}

func (l *layerFS) ReleaseDir(in *fuse.ReleaseIn) {}

// listing lists "." and ".." and then the children in name order; an
// entry's offset is its index + 1. overlayfs passes a lower directory's
// listing through as is, so without the dot entries a container would not
// see them in `ls -a`.
func (l *layerFS) listing(n *inode) []fuse.DirEntry {
	if p := l.dirents[n.ino].Load(); p != nil {
		return *p
	}
	names := make([]string, 0, len(n.children))
	for name := range n.children {
		names = append(names, name)
	}
	sort.Strings(names)
	entries := make([]fuse.DirEntry, 0, len(names)+2)
	entries = append(entries,
		fuse.DirEntry{Name: ".", Mode: syscall.S_IFDIR, Ino: n.ino},
		fuse.DirEntry{Name: "..", Mode: syscall.S_IFDIR, Ino: l.parents[n.ino]},
	)
	for _, name := range names {
		c := n.children[name]
		entries = append(entries, fuse.DirEntry{Name: name, Mode: c.typ, Ino: c.ino})
	}
	for i := range entries {
		entries[i].Off = uint64(i + 1)
	}
	l.dirents[n.ino].Store(&entries)
	return entries
}

func (l *layerFS) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	n := l.node(in.NodeId)
	if n == nil || !n.isDir() {
		return fuse.Status(syscall.ESTALE)
	}
	entries := l.listing(n)
	for i := int(min(in.Offset, uint64(len(entries)))); i < len(entries); i++ {
		if !out.AddDirEntry(entries[i]) {
			break
		}
	}
	return fuse.OK
}

// ReadDirPlus lists like ReadDir with each entry's attributes, saving the
// kernel a LOOKUP per name. The dot entries carry no node: the kernel
// ignores them.
func (l *layerFS) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	n := l.node(in.NodeId)
	if n == nil || !n.isDir() {
		return fuse.Status(syscall.ESTALE)
	}
	entries := l.listing(n)
	for i := int(min(in.Offset, uint64(len(entries)))); i < len(entries); i++ {
		e := out.AddDirLookupEntry(entries[i])
		if e == nil {
			break
		}
		if i >= 2 {
			l.fillEntry(l.nodes[entries[i].Ino], e)
		}
	}
	return fuse.OK
}

// StatFs reports a name length limit: overlayfs takes the smallest limit of
// its layers, and a zero limit makes it reject every name of a view that
// has no upper directory (ENAMETOOLONG). Block counts are zero: the view
// is read-only and its contents live in the store.
func (l *layerFS) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	*out = fuse.StatfsOut{}
	out.NameLen = 255
	out.Bsize = 4096
	out.Frsize = 4096
	return fuse.OK
}
