package fs

import (
	"context"
	"errors"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/worker/store"
)

// layerFS answers the kernel's requests about one layer view. Its only
// state is the layer's tree: the kernel's node IDs are the tree's inode
// numbers (the root is 1, FUSE's root ID), so a process that takes the
// connection over answers for every node the kernel looked up before.
type layerFS struct {
	// RawFileSystem answers ENOSYS to what a read-only layer does not
	// do (and the kernel then stops asking).
	fuse.RawFileSystem

	layer  digest.Digest
	store  *store.Store
	onOpen func(layer digest.Digest, name string)
	onRead func(layer digest.Digest, name string, off, size int64)
	// passthrough hands complete contents to the kernel.
	passthrough bool
	ctx         context.Context // done when the layer is unmounted or detached

	nodes   []*inode      // by inode number; nodes[0] is nil
	parents []uint64      // by inode number, for directories
	opened  []atomic.Bool // by inode number: OnOpen was called
	dirents []atomic.Pointer[[]fuse.DirEntry]

	modes *ioModes
	conn  *conn // registers backing files

	// files caches open complete contents for the reads served here
	// (at most maxOpenContents; any entry may be evicted and closed).
	filesMu sync.Mutex
	files   map[uint64]*os.File
}

// maxOpenContents bounds the complete contents a view keeps open for the
// reads it serves.
const maxOpenContents = 256

func newLayerFS(ctx context.Context, layer digest.Digest, root *inode, opts Options, modes *ioModes) *layerFS {
	l := &layerFS{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		layer:         layer, store: opts.Store, onOpen: opts.OnOpen, onRead: opts.OnRead,
		passthrough: !opts.NoPassthrough, ctx: ctx, modes: modes,
	}
	// Inode numbers are dense, 1 to the number of inodes.
	var highest func(n *inode) uint64
	highest = func(n *inode) uint64 {
		h := n.ino
		for _, c := range n.children {
			h = maxU(h, highest(c))
		}
		return h
	}
	n := highest(root)
	l.nodes = make([]*inode, n+1)
	l.parents = make([]uint64, n+1)
	l.opened = make([]atomic.Bool, n+1)
	l.dirents = make([]atomic.Pointer[[]fuse.DirEntry], n+1)
	var index func(parent, n *inode)
	index = func(parent, n *inode) {
		l.nodes[n.ino] = n
		if n.isDir() {
			l.parents[n.ino] = parent.ino
			for _, c := range n.children {
				index(n, c)
			}
		}
	}
	index(root, root)
	return l
}

func maxU(a, b uint64) uint64 {
	if a > b {
		return a
	}
	return b
}

func (l *layerFS) String() string { return "starlight" }

// node returns the inode the kernel's node ID names.
func (l *layerFS) node(id uint64) *inode {
	if id == 0 || id >= uint64(len(l.nodes)) {
		return nil
	}
	return l.nodes[id]
}

func (l *layerFS) fillAttr(n *inode, a *fuse.Attr) {
	a.Ino = n.ino
	a.Mode = n.typ | n.mode
	a.Size = uint64(n.size)
	a.Blocks = (a.Size + 4095) / 4096 * 8
	a.Uid = n.uid
	a.Gid = n.gid
	a.Nlink = n.nlink
	a.Rdev = n.rdev
	a.Blksize = 4096
	a.SetTimes(&n.mtime, &n.mtime, &n.mtime)
}

func (l *layerFS) fillEntry(n *inode, out *fuse.EntryOut) {
	out.NodeId = n.ino
	out.Generation = 0
	l.fillAttr(n, &out.Attr)
	out.SetEntryTimeout(cacheTimeout)
	out.SetAttrTimeout(cacheTimeout)
}

func (l *layerFS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	dir := l.node(h.NodeId)
	if dir == nil {
		return fuse.Status(syscall.ESTALE)
	}
	if !dir.isDir() {
		return fuse.Status(syscall.ENOTDIR)
	}
	var c *inode
	switch name {
	case ".":
		c = dir
	case "..":
		c = l.node(l.parents[dir.ino])
	default:
		c = dir.children[name]
	}
	if c == nil {
		// A negative entry the kernel may cache: the layer never
		// changes.
		*out = fuse.EntryOut{}
		out.SetEntryTimeout(cacheTimeout)
		return fuse.OK
	}
	l.fillEntry(c, out)
	return fuse.OK
}

func (l *layerFS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	n := l.node(in.NodeId)
	if n == nil {
		return fuse.Status(syscall.ESTALE)
	}
	l.fillAttr(n, &out.Attr)
	out.SetTimeout(cacheTimeout)
	return fuse.OK
}

func (l *layerFS) Readlink(cancel <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	n := l.node(h.NodeId)
	if n == nil {
		return nil, fuse.Status(syscall.ESTALE)
	}
	if n.typ != syscall.S_IFLNK {
		return nil, fuse.EINVAL
	}
	return []byte(n.target), fuse.OK
}

func (l *layerFS) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	n := l.node(h.NodeId)
	if n == nil {
		return 0, fuse.Status(syscall.ESTALE)
	}
	v, ok := n.xattrs[attr]
	if !ok {
		return 0, fuse.ENODATA
	}
	if len(dest) < len(v) {
		return uint32(len(v)), fuse.ERANGE
	}
	return uint32(copy(dest, v)), fuse.OK
}

func (l *layerFS) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	n := l.node(h.NodeId)
	if n == nil {
		return 0, fuse.Status(syscall.ESTALE)
	}
	var size int
	for _, k := range n.xattrNames() {
		size += len(k) + 1
	}
	if len(dest) < size {
		return uint32(size), fuse.ERANGE
	}
	off := 0
	for _, k := range n.xattrNames() {
		off += copy(dest[off:], k)
		dest[off] = 0
		off++
	}
	return uint32(size), fuse.OK
}

func (l *layerFS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	n := l.node(in.NodeId)
	if n == nil {
		return fuse.Status(syscall.ESTALE)
	}
	if n.typ != syscall.S_IFREG {
		return fuse.EINVAL
	}
	if in.Flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC|syscall.O_APPEND) != 0 {
		return fuse.EROFS
	}
	if l.onOpen != nil && !l.opened[n.ino].Swap(true) {
		l.onOpen(l.layer, n.name)
	}
	// The content never changes: keep the page cache across opens.
	out.OpenFlags = fuse.FOPEN_KEEP_CACHE
	if n.digest == "" {
		return fuse.OK
	}
	var passthrough func() (int32, bool)
	if l.passthrough {
		passthrough = func() (int32, bool) { return l.registerContent(n) }
	}
	fh, id, pt, err := l.modes.open(n.ino, passthrough)
	if err != nil {
		log.G(l.ctx).WithError(err).WithField("layer", l.layer).WithField("name", n.name).Error("open")
		return fuse.EIO
	}
	if pt {
		out.OpenFlags = fuse.FOPEN_PASSTHROUGH
		out.BackingID = id
		return fuse.OK
	}
	out.Fh = fh
	return fuse.OK
}

// registerContent registers n's content, if complete, as a passthrough
// backing file of the connection.
func (l *layerFS) registerContent(n *inode) (int32, bool) {
	if l.conn == nil || !l.store.Has(n.digest) {
		return 0, false
	}
	f, err := l.store.Open(n.digest)
	if err != nil {
		return 0, false
	}
	defer f.Close() // the kernel holds its own reference
	id, err := l.conn.registerBacking(f)
	if err != nil {
		log.G(l.ctx).WithError(err).WithField("layer", l.layer).Debug("passthrough refused; serving reads here")
		return 0, false
	}
	return id, true
}

func (l *layerFS) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	l.modes.release(in.NodeId, in.Fh)
}

// servedReads counts the reads this process served, that is, the reads
// that did not go through passthrough.
var servedReads atomic.Int64

func (l *layerFS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	servedReads.Add(1)
	m := l.node(in.NodeId)
	if m == nil {
		return nil, fuse.Status(syscall.ESTALE)
	}
	off := int64(in.Offset)
	if off >= m.size || len(buf) == 0 {
		return fuse.ReadResultData(nil), fuse.OK
	}
	dest := buf[:min(int64(len(buf)), m.size-off)]
	if l.onRead != nil {
		l.onRead(l.layer, m.name, off, int64(len(dest)))
	}
	if n, ok := l.readComplete(m, dest, off); ok {
		return fuse.ReadResultData(dest[:n]), fuse.OK
	}
	// The request's cancel channel closes on a FUSE INTERRUPT; reads
	// issued by kernel readahead are never interrupted, so unmounting
	// (or detaching) ends them.
	ctx, stop := context.WithCancel(l.ctx)
	defer stop()
	go func() {
		select {
		case <-cancel:
			stop()
		case <-ctx.Done():
		}
	}()
	n, err := l.store.ReadAt(ctx, m.digest, dest, off)
	if err != nil && !(errors.Is(err, io.EOF) && n == len(dest)) {
		if ctx.Err() != nil {
			return nil, fuse.EINTR
		}
		log.G(ctx).WithError(err).WithFields(log.Fields{
			"layer": l.layer, "name": m.name, "offset": off,
		}).Warn("read failed")
		return nil, fuse.EIO
	}
	return fuse.ReadResultData(dest[:n]), fuse.OK
}

// readComplete reads from m's content if it is complete, from a file kept
// open for the next reads; ok is false if the content is not complete.
func (l *layerFS) readComplete(m *inode, dest []byte, off int64) (n int, ok bool) {
	for range 2 {
		l.filesMu.Lock()
		f := l.files[m.ino]
		l.filesMu.Unlock()
		if f == nil {
			if !l.store.Has(m.digest) {
				return 0, false
			}
			var err error
			if f, err = l.store.Open(m.digest); err != nil {
				return 0, false
			}
			l.filesMu.Lock()
			if l.files == nil {
				l.files = make(map[uint64]*os.File)
			}
			if len(l.files) >= maxOpenContents {
				for ino, old := range l.files {
					old.Close()
					delete(l.files, ino)
					break
				}
			}
			if other := l.files[m.ino]; other != nil {
				f.Close()
				f = other
			} else {
				l.files[m.ino] = f
			}
			l.filesMu.Unlock()
		}
		n, err := f.ReadAt(dest, off)
		if errors.Is(err, os.ErrClosed) {
			continue // evicted meanwhile
		}
		if err != nil && !(errors.Is(err, io.EOF) && n == len(dest)) {
			return 0, false // the slow path reports it
		}
		return n, true
	}
	return 0, false
}

// closeFiles closes the contents kept open for reads.
func (l *layerFS) closeFiles() {
	l.filesMu.Lock()
	defer l.filesMu.Unlock()
	for ino, f := range l.files {
		f.Close()
		delete(l.files, ino)
	}
}
