// Package fs exposes one layer of an image as a read-only FUSE filesystem,
// built from the layer's file tree (api.LayerTree) before any content has
// arrived.
//
// The view is exactly what containerd's overlayfs snapshotter would have
// unpacked for that layer (whiteouts as 0:0 character devices, opaque
// directories as trusted.overlay.opaque=y), so that the snapshotter can
// stack these mounts as overlayfs lower directories.
//
// Regular files are served from the content store: a read of a content
// that has not arrived blocks until the chunks it covers are in (a FUSE
// interrupt cancels it), and fails with EIO if the content failed. A file
// whose content is complete when it is opened is handed to the kernel with
// FUSE passthrough, so its reads never reach this process.
package fs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/log"
	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/store"
)

// cacheTimeout is how long the kernel may cache entries, attributes and
// negative lookups. A layer is immutable, so this is only bounded to let
// the kernel reclaim memory.
const cacheTimeout = time.Hour

// Options configure a layer mount.
type Options struct {
	// Store serves the contents of regular files. Required unless the
	// layer has no non-empty regular file.
	Store *store.Store
	// OnOpen, if not nil, is called the first time each file is opened
	// (hook for access traces).
	OnOpen func(layer digest.Digest, name string)
	// OnRead, if not nil, is called with every read this process serves:
	// the file (by its name in the tree), offset and length asked. Reads
	// that the kernel serves from its page cache or through passthrough
	// never get here; set NoPassthrough to see every first read. It runs
	// on the read path and must be cheap.
	OnRead func(layer digest.Digest, name string, off, size int64)
	// NoPassthrough serves every read through this process, even of a
	// complete content (from the complete file, without copying through
	// user space where the kernel can splice). A traced view uses it.
	NoPassthrough bool
	// Debug logs every FUSE request.
	Debug bool
}

// MountedLayer is a live FUSE mount of one layer.
type MountedLayer struct {
	server     *fuse.Server
	mountpoint string
	cancel     context.CancelFunc // ends the reads still waiting for content
	once       sync.Once
	err        error
}

// Mount mounts the view of tree on mountpoint (an existing directory) and
// returns once the mount is live. It needs root (CAP_SYS_ADMIN) and
// /dev/fuse.
func Mount(mountpoint string, tree api.LayerTree, opts Options) (*MountedLayer, error) {
	layer, err := api.ParseDigest(tree.Digest)
	if err != nil {
		return nil, fmt.Errorf("mounting layer: %w", err)
	}
	root, err := buildTree(tree.Entries)
	if err != nil {
		return nil, fmt.Errorf("mounting layer %s: %w", layer, err)
	}
	if opts.Store == nil && hasContent(root) {
		return nil, fmt.Errorf("mounting layer %s: no content store", layer)
	}
	ctx, cancel := context.WithCancel(context.Background())
	l := &layerFS{layer: layer, store: opts.Store, onOpen: opts.OnOpen, onRead: opts.OnRead,
		passthrough: !opts.NoPassthrough, ctx: ctx}
	timeout := cacheTimeout
	fsopts := &gofs.Options{
		MountOptions: fuse.MountOptions{
			AllowOther:        true,
			DirectMount:       true,
			DirectMountStrict: true,
			// Read-only, and without the nosuid/nodev go-fuse adds by
			// default: setuid binaries and device nodes of the image
			// must work as on an unpacked layer.
			DirectMountFlags: syscall.MS_RDONLY,
			// Let the kernel check permissions against the modes and
			// owners, as on a local filesystem.
			Options:  []string{"default_permissions"},
			FsName:   "starlight",
			Name:     "starlight",
			MaxWrite: 1 << 20, // also the largest read request
			// Kernel readahead of a file read through this process
			// (one not complete when opened) is one request: if its
			// window reaches into a chunk that has not arrived, the
			// whole request waits for it. A modest window keeps
			// such waits to the neighbouring chunk.
			MaxReadAhead: 128 << 10,
			Debug:        opts.Debug,
		},
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &timeout,
		// Modes are served as they are, 0 included (whiteouts, and
		// files like /etc/shadow in some images).
		NullPermissions: true,
		RootStableAttr:  &gofs.StableAttr{Ino: root.ino},
	}
	server, err := gofs.Mount(mountpoint, &rootNode{node: node{l: l, m: root}}, fsopts)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("mounting layer %s on %s: %w", layer, mountpoint, err)
	}
	return &MountedLayer{server: server, mountpoint: mountpoint, cancel: cancel}, nil
}

func hasContent(n *inode) bool {
	if n.digest != "" {
		return true
	}
	for _, c := range n.children {
		if hasContent(c) {
			return true
		}
	}
	return false
}

// Mountpoint returns where the layer is mounted.
func (m *MountedLayer) Mountpoint() string { return m.mountpoint }

// Unmount unmounts the layer. If the mount is busy it is detached (lazy
// unmount), so it disappears from the namespace at once and goes away when
// its last user does.
func (m *MountedLayer) Unmount() error {
	m.once.Do(func() {
		// Readahead requests are not interrupted by the kernel; once
		// the mount is gone nobody waits for their answer.
		defer m.cancel()
		if err := m.server.Unmount(); err != nil {
			if derr := syscall.Unmount(m.mountpoint, syscall.MNT_DETACH); derr != nil {
				m.err = fmt.Errorf("unmounting %s: %w (lazy unmount: %v)", m.mountpoint, err, derr)
			}
		}
	})
	return m.err
}

// Wait blocks until the filesystem is unmounted.
func (m *MountedLayer) Wait() { m.server.Wait() }

// layerFS is what every node of one mount shares.
type layerFS struct {
	layer  digest.Digest
	store  *store.Store
	onOpen func(layer digest.Digest, name string)
	onRead func(layer digest.Digest, name string, off, size int64)
	// passthrough hands complete contents to the kernel.
	passthrough bool
	ctx         context.Context // done when the layer is unmounted
}

// node is a file of the view. One node per inode: hard links add the same
// node under several names.
type node struct {
	gofs.Inode
	l *layerFS
	m *inode

	opened atomic.Bool // OnOpen was called

	// cachedOpens counts the open handles that read through this
	// process (page-cache mode). The kernel refuses to mix them with
	// passthrough handles on one inode, so passthrough is used only when
	// there are none.
	mu          sync.Mutex
	cachedOpens int
}

var (
	_ gofs.NodeGetattrer   = (*node)(nil)
	_ gofs.NodeReadlinker  = (*node)(nil)
	_ gofs.NodeGetxattrer  = (*node)(nil)
	_ gofs.NodeListxattrer = (*node)(nil)
	_ gofs.NodeOpener      = (*node)(nil)
	_ gofs.NodeOnAdder     = (*rootNode)(nil)
)

// rootNode builds the whole tree of inodes when the mount starts.
type rootNode struct {
	node
}

func (r *rootNode) OnAdd(ctx context.Context) {
	nodes := map[*inode]*gofs.Inode{r.m: &r.Inode}
	var add func(dir *gofs.Inode, m *inode)
	add = func(dir *gofs.Inode, m *inode) {
		for name, c := range m.children {
			child, ok := nodes[c]
			if !ok {
				child = dir.NewPersistentInode(ctx, &node{l: r.l, m: c}, gofs.StableAttr{Mode: c.typ, Ino: c.ino})
				nodes[c] = child
				if c.isDir() {
					add(child, c)
				}
			}
			dir.AddChild(name, child, false)
		}
	}
	add(&r.Inode, r.m)
}

func (n *node) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	m := n.m
	out.Ino = m.ino
	out.Mode = m.typ | m.mode
	out.Size = uint64(m.size)
	out.Uid = m.uid
	out.Gid = m.gid
	out.Nlink = m.nlink
	out.Rdev = m.rdev
	out.Blksize = 4096
	out.SetTimes(&m.mtime, &m.mtime, &m.mtime)
	return 0
}

func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	if n.m.typ != syscall.S_IFLNK {
		return nil, syscall.EINVAL
	}
	return []byte(n.m.target), 0
}

func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	v, ok := n.m.xattrs[attr]
	if !ok {
		return 0, syscall.ENODATA
	}
	if len(dest) < len(v) {
		return uint32(len(v)), syscall.ERANGE
	}
	return uint32(copy(dest, v)), 0
}

func (n *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	var size int
	for _, k := range n.m.xattrNames() {
		size += len(k) + 1
	}
	if len(dest) < size {
		return uint32(size), syscall.ERANGE
	}
	off := 0
	for _, k := range n.m.xattrNames() {
		off += copy(dest[off:], k)
		dest[off] = 0
		off++
	}
	return uint32(size), 0
}

func (n *node) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	if n.m.typ != syscall.S_IFREG {
		return nil, 0, syscall.EINVAL
	}
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC|syscall.O_APPEND) != 0 {
		return nil, 0, syscall.EROFS
	}
	if n.l.onOpen != nil && !n.opened.Swap(true) {
		n.l.onOpen(n.l.layer, n.m.name)
	}
	// The content never changes: keep the page cache across opens.
	const fuseFlags = fuse.FOPEN_KEEP_CACHE
	if n.m.digest == "" {
		return &handle{n: n}, fuseFlags, 0
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.l.passthrough && n.cachedOpens == 0 && n.l.store.Has(n.m.digest) {
		if f, err := n.l.store.Open(n.m.digest); err == nil {
			// go-fuse registers f as the backing file (passthrough)
			// and drops KEEP_CACHE; if the kernel refuses, reads
			// come here and are served from f.
			return &handle{n: n, f: f, passthrough: true}, fuseFlags, 0
		}
	}
	n.cachedOpens++
	return &handle{n: n}, fuseFlags, 0
}

// handle is an open regular file.
type handle struct {
	n *node
	// passthrough handles are opened on complete contents and offer f
	// to the kernel as the backing file.
	passthrough bool

	mu sync.Mutex
	f  *os.File // the complete content, once known to be complete
}

var (
	_ gofs.FilePassthroughFder = (*handle)(nil)
	_ gofs.FileReader          = (*handle)(nil)
	_ gofs.FileReleaser        = (*handle)(nil)
)

// PassthroughFd implements FilePassthroughFder. It is only asked when the
// inode has no backing file yet; a handle opened before its content was
// complete declines, so it keeps reading through ReadAt.
func (h *handle) PassthroughFd() (int, bool) {
	if !h.passthrough {
		return 0, false
	}
	return int(h.f.Fd()), true
}

// servedReads counts the reads this process served, that is, the reads
// that did not go through passthrough.
var servedReads atomic.Int64

func (h *handle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	servedReads.Add(1)
	m := h.n.m
	if off >= m.size || len(dest) == 0 {
		return fuse.ReadResultData(nil), 0
	}
	dest = dest[:min(int64(len(dest)), m.size-off)]
	if h.n.l.onRead != nil {
		h.n.l.onRead(h.n.l.layer, m.name, off, int64(len(dest)))
	}
	if f := h.complete(); f != nil {
		return fuse.ReadResultFd(f.Fd(), off, len(dest)), 0
	}
	// The request's context is done on a FUSE INTERRUPT; reads issued
	// by kernel readahead are never interrupted, so unmounting ends them.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(h.n.l.ctx, cancel)
	defer stop()
	n, err := h.n.l.store.ReadAt(ctx, m.digest, dest, off)
	if err != nil && !(errors.Is(err, io.EOF) && n == len(dest)) {
		if ctx.Err() != nil {
			return nil, syscall.EINTR
		}
		log.G(ctx).WithError(err).WithFields(log.Fields{
			"layer": h.n.l.layer, "name": m.name, "offset": off,
		}).Warn("read failed")
		return nil, syscall.EIO
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// complete returns the complete content file, opening it the first time
// the content is found complete.
func (h *handle) complete() *os.File {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.f == nil && h.n.l.store.Has(h.n.m.digest) {
		if f, err := h.n.l.store.Open(h.n.m.digest); err == nil {
			h.f = f
		}
	}
	return h.f
}

func (h *handle) Release(ctx context.Context) syscall.Errno {
	if !h.passthrough && h.n.m.digest != "" {
		h.n.mu.Lock()
		h.n.cachedOpens--
		h.n.mu.Unlock()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.f != nil {
		h.f.Close()
		h.f = nil
	}
	return 0
}
