package fs

import (
	"context"
	"sort"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

var (
	_ gofs.NodeReaddirer      = (*node)(nil)
	_ gofs.NodeOpendirHandler = (*node)(nil)
	_ gofs.NodeStatfser       = (*node)(nil)
)

// OpendirHandle lets the kernel cache directory listings (FOPEN_CACHE_DIR)
// and keep them across opens (FOPEN_KEEP_CACHE): a layer never changes, and
// overlayfs reads every lower directory of a merged one on each readdir, so
// without the cache a metadata walk (`find /`) crosses into this process
// once per directory and layer, every time.
func (n *node) OpendirHandle(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	ds, errno := n.Readdir(ctx)
	if errno != 0 {
		return nil, 0, errno
	}
	return ds, fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE, 0
}

// Readdir lists "." and ".." and then the children in name order. go-fuse
// lists only the children of an in-memory tree, and overlayfs passes a
// lower directory's listing through as is, so without the dot entries a
// container would not see them in `ls -a`.
func (n *node) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	names := make([]string, 0, len(n.m.children))
	for name := range n.m.children {
		names = append(names, name)
	}
	sort.Strings(names)

	parentIno := n.m.ino
	if _, parent := n.Parent(); parent != nil {
		parentIno = parent.StableAttr().Ino
	}
	entries := make([]fuse.DirEntry, 0, len(names)+2)
	entries = append(entries,
		fuse.DirEntry{Name: ".", Mode: syscall.S_IFDIR, Ino: n.m.ino},
		fuse.DirEntry{Name: "..", Mode: syscall.S_IFDIR, Ino: parentIno},
	)
	for _, name := range names {
		c := n.m.children[name]
		entries = append(entries, fuse.DirEntry{Name: name, Mode: c.typ, Ino: c.ino})
	}
	return gofs.NewListDirStream(entries), 0
}

// Statfs reports a name length limit: overlayfs takes the smallest limit of
// its layers, and a zero limit makes it reject every name of a view that
// has no upper directory (ENAMETOOLONG). Block counts are zero: the view
// is read-only and its contents live in the store.
func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	*out = fuse.StatfsOut{}
	out.NameLen = 255
	out.Bsize = 4096
	out.Frsize = 4096
	return 0
}
