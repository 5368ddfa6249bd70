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
//
// A view can outlive the process that serves it (Options.Keeper): its
// /dev/fuse connection is kept outside the process, and the next process
// that mounts the same layer on the same directory takes the connection
// over instead of mounting again. Everything the kernel holds about the
// view stays valid across the takeover, because nothing of it lives only
// in the process that served it:
//
//   - node IDs are the tree's inode numbers, which the tree alone
//     determines (assignInodes), and which a takeover keeps even if this
//     version of the worker numbers the tree otherwise (the inode map);
//   - file handles carry no state a new process could not rebuild, and
//     each inode's I/O mode (passthrough with its backing file, or served
//     here), which the kernel requires to stay consistent while files are
//     open, is logged next to the connection (iomodes.go);
//   - the kernel's INIT request is kept with the connection and replayed
//     into the new server, so both sides agree on the protocol;
//   - requests the old process had read but not answered are sent again
//     by the kernel (FUSE_NOTIFY_RESEND, Linux 6.9), and requests that
//     arrived meanwhile wait in the kernel's queue.
//
// The FUSE protocol is go-fuse's (fuse.ProtocolServer), on a connection this
// package mounts and reads itself (server.go).
package fs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

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
	// complete content (from the complete file). A traced view uses it.
	NoPassthrough bool
	// Keeper, if not nil, keeps the mount's connection outside this
	// process, so that the mount outlives it (see Detach) and the next
	// process's Mount of the same directory takes it over. StateDir is
	// then required.
	Keeper FDKeeper
	// StateDir holds what a takeover needs besides the connection (the
	// INIT exchange, the inodes' I/O modes). It is created if needed and
	// belongs to the mount.
	StateDir string
	// Debug logs every FUSE request.
	Debug bool
}

// FDKeeper keeps file descriptors outside the process (package fdstore).
type FDKeeper interface {
	// Keep stores a duplicate of f under name, replacing what name held.
	Keep(name string, f *os.File) error
	// Take returns, once, the descriptor an earlier process kept under
	// name; it stays kept.
	Take(name string) (*os.File, bool)
	// Drop forgets name and closes the kept copy.
	Drop(name string) error
}

// MountedLayer is a live FUSE mount of one layer.
type MountedLayer struct {
	conn       *conn
	mountpoint string
	keeper     FDKeeper // nil: the mount ends with this process
	keptName   string
	stateDir   string
	cancel     context.CancelFunc // ends the reads still waiting for content
	once       sync.Once
	err        error
	// TakenOver reports that Mount took over the connection of an
	// earlier process instead of mounting.
	TakenOver bool
}

// Mount mounts the view of tree on mountpoint (an existing directory) and
// returns once the mount is live. It needs root (CAP_SYS_ADMIN) and
// /dev/fuse.
//
// With opts.Keeper, a mount of the same directory that an earlier process
// kept is taken over: it is served again, from where that process stopped,
// and the containers that use it never notice. Otherwise a mount left on
// mountpoint (dead: "transport endpoint is not connected") is detached and
// the view mounted anew.
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
	if opts.Keeper != nil && opts.StateDir == "" {
		return nil, fmt.Errorf("mounting layer %s: a kept mount needs a state directory", layer)
	}
	if opts.Keeper != nil {
		m, err := takeOver(mountpoint, layer, root, opts)
		if err == nil {
			return m, nil
		}
		if !errors.Is(err, errNotKept) {
			log.L.WithError(err).WithField("layer", layer).WithField("mountpoint", mountpoint).
				Error("cannot take over the kept mount; mounting the layer again (its users lose it)")
		}
	}
	// A worker that crashed without a keeper leaves its FUSE mounts
	// behind, dead: detach them first.
	_ = syscall.Unmount(mountpoint, syscall.MNT_DETACH)
	return mountNew(mountpoint, layer, root, opts)
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

// mountOptions are the FUSE options of every view. A takeover relies on
// them being the ones the kept connection was mounted with; mountState
// records what was negotiated.
func mountOptions(debug bool) *fuse.MountOptions {
	return &fuse.MountOptions{
		// Read-only, and without nosuid/nodev: setuid binaries and
		// device nodes of the image must work as on an unpacked layer.
		FsName: "starlight",
		Name:   "starlight",
		// Also the largest read request.
		MaxWrite: 1 << 20,
		// Kernel readahead of a file read through this process (one
		// not complete when opened) is one request: if its window
		// reaches into a chunk that has not arrived, the whole request
		// waits for it. A modest window keeps such waits to the
		// neighbouring chunk.
		MaxReadAhead: 128 << 10,
		Debug:        debug,
	}
}

// mountNew mounts a fresh connection.
func mountNew(mountpoint string, layer digest.Digest, root *inode, opts Options) (*MountedLayer, error) {
	mo := mountOptions(opts.Debug)
	var modes *ioModes
	if opts.Keeper != nil {
		if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
			return nil, fmt.Errorf("mounting layer %s: %w", layer, err)
		}
		// A new connection starts with no inode in any I/O mode.
		var err error
		if modes, err = createIOModes(filepath.Join(opts.StateDir, ioModesFile)); err != nil {
			return nil, fmt.Errorf("mounting layer %s: %w", layer, err)
		}
	} else {
		modes = newIOModes()
	}
	ctx, cancel := context.WithCancel(context.Background())
	l := newLayerFS(ctx, layer, root, opts, modes)
	fd, err := mountFUSE(mountpoint, mo)
	if err != nil {
		cancel()
		modes.close()
		return nil, fmt.Errorf("mounting layer %s on %s: %w", layer, mountpoint, err)
	}
	c, err := newConn(fd, l, mo)
	if err != nil {
		syscall.Unmount(mountpoint, syscall.MNT_DETACH)
		unix.Close(fd)
		cancel()
		modes.close()
		return nil, fmt.Errorf("mounting layer %s on %s: %w", layer, mountpoint, err)
	}
	l.conn = c
	st, err := c.initNew()
	if err == nil && opts.Keeper != nil {
		st.Dev, err = mountDevice(mountpoint)
		if err == nil {
			err = writeInodeMap(opts.StateDir, root)
		}
		if err == nil {
			err = writeMountState(opts.StateDir, st)
		}
	}
	serving := err == nil
	if serving {
		go c.serve()
		err = pollHack(mountpoint)
	}
	if err != nil {
		syscall.Unmount(mountpoint, syscall.MNT_DETACH)
		if serving {
			c.detach()
		} else {
			close(c.done)
		}
		c.closeWhenDone()
		cancel()
		modes.close()
		return nil, fmt.Errorf("mounting layer %s on %s: %w", layer, mountpoint, err)
	}
	m := &MountedLayer{conn: c, mountpoint: mountpoint, cancel: cancel}
	if opts.Keeper != nil {
		name := keptName(mountpoint)
		err := keep(opts.Keeper, name, c)
		if err != nil {
			// The view works; it just will not outlive this process.
			log.L.WithError(err).WithField("layer", layer).Warn("cannot keep the FUSE connection outside the worker: " +
				"this view ends with the worker process")
		} else {
			m.keeper, m.keptName, m.stateDir = opts.Keeper, name, opts.StateDir
		}
	}
	return m, nil
}

// keep hands a duplicate of c's descriptor to the keeper.
func keep(k FDKeeper, name string, c *conn) error {
	f, err := c.file()
	if err != nil {
		return err
	}
	defer f.Close()
	return k.Keep(name, f)
}

// Mountpoint returns where the layer is mounted.
func (m *MountedLayer) Mountpoint() string { return m.mountpoint }

// Unmount unmounts the layer: the explicit end of the view (no snapshot
// uses it any more), unlike Detach. If the mount is busy it is detached
// (lazy unmount), so it disappears from the namespace at once and goes
// away when its last user does. The kept connection is dropped.
func (m *MountedLayer) Unmount() error {
	m.once.Do(func() {
		// Readahead requests are not interrupted by the kernel; once
		// the mount is gone nobody waits for their answer.
		defer m.cancel()
		if err := syscall.Unmount(m.mountpoint, 0); err != nil {
			if derr := syscall.Unmount(m.mountpoint, syscall.MNT_DETACH); derr != nil {
				m.err = fmt.Errorf("unmounting %s: %w (lazy unmount: %v)", m.mountpoint, err, derr)
				return
			}
		}
		if m.keeper != nil {
			if err := m.keeper.Drop(m.keptName); err != nil {
				log.L.WithError(err).WithField("mountpoint", m.mountpoint).Warn("dropping the kept FUSE connection")
			}
			os.RemoveAll(m.stateDir)
		}
		m.conn.closeWhenDone()
		go func() { <-m.conn.done; m.conn.fs.closeFiles() }()
	})
	return m.err
}

// Kept reports whether the mount outlives this process (Detach).
func (m *MountedLayer) Kept() bool { return m.keeper != nil }

// Detach stops serving the view and leaves it mounted, for the next
// process to take over: the worker stops, the containers stay. Requests
// still unanswered are left to the kernel, which sends them to the next
// server. A view that is not kept (Kept) is unmounted instead.
func (m *MountedLayer) Detach() error {
	if m.keeper == nil {
		return m.Unmount()
	}
	m.once.Do(func() {
		m.conn.detach()
		m.cancel()
		m.conn.fs.modes.close()
		m.conn.fs.closeFiles()
	})
	return nil
}

// Wait blocks until the filesystem is unmounted (or detached).
func (m *MountedLayer) Wait() { <-m.conn.done }
