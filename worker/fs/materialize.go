package fs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"syscall"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/starlight-project/starlight/api"
)

// overlayfs' metadata-only files: a file with these xattrs has its own
// inode (owner, mode, xattrs, link count, size) and takes its data from
// the file at the redirect's absolute path in a data-only lower layer
// (lowerdir=...::DATA, metacopy=on; Linux 6.5 and later).
const (
	metacopyXattr = "trusted.overlay.metacopy"
	redirectXattr = "trusted.overlay.redirect"
)

// Materialize writes the view of a layer as a plain directory at dst,
// which must not exist: the same tree the FUSE view serves (whiteouts as
// 0:0 character devices, opaque directories marked), with every regular
// file that has content as an overlayfs metadata-only file whose data is
// redirect(digest), a path in the data-only layer the content store's
// files are in (keep it short: see store.DataPath). Hard links are hard links. The directory is only usable as
// an overlayfs lower layer stacked above that data layer; it needs root
// (trusted.* xattrs, devices, owners).
func Materialize(dst string, tree api.LayerTree, redirect func(digest.Digest) (string, error)) error {
	root, err := buildTree(tree.Entries)
	if err != nil {
		return fmt.Errorf("materializing layer %s: %w", tree.Digest, err)
	}
	w := &materializer{redirect: redirect, first: map[*inode]string{}}
	if err := os.Mkdir(dst, 0o700); err != nil {
		return err
	}
	if err := w.dir(root, dst); err != nil {
		return fmt.Errorf("materializing layer %s: %w", tree.Digest, err)
	}
	return nil
}

type materializer struct {
	redirect func(digest.Digest) (string, error)
	first    map[*inode]string // the path an inode was created at
}

// dir fills the directory p with n's children, then gives it n's
// attributes (last, so that a read-only directory or its mtime is not
// changed by what goes into it).
func (w *materializer) dir(n *inode, p string) error {
	names := make([]string, 0, len(n.children))
	for k := range n.children {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		c, cp := n.children[k], filepath.Join(p, k)
		if first, ok := w.first[c]; ok {
			if err := os.Link(first, cp); err != nil {
				return err
			}
			continue
		}
		w.first[c] = cp
		if err := w.create(c, cp); err != nil {
			return fmt.Errorf("%s: %w", c.name, err)
		}
		if c.isDir() {
			if err := w.dir(c, cp); err != nil {
				return err
			}
		}
	}
	return setAttrs(n, p)
}

// create makes n at p, with everything but a directory's attributes.
func (w *materializer) create(n *inode, p string) error {
	switch n.typ {
	case syscall.S_IFDIR:
		return os.Mkdir(p, 0o700)
	case syscall.S_IFREG:
		f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		err = f.Truncate(n.size) // sparse: the data is in the data layer
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
		if n.digest != "" {
			target, err := w.redirect(n.digest)
			if err != nil {
				return err
			}
			if err := unix.Lsetxattr(p, metacopyXattr, nil, 0); err != nil {
				return fmt.Errorf("metacopy xattr: %w", err)
			}
			if err := unix.Lsetxattr(p, redirectXattr, []byte(target), 0); err != nil {
				return fmt.Errorf("redirect xattr: %w", err)
			}
		}
	case syscall.S_IFLNK:
		if err := os.Symlink(n.target, p); err != nil {
			return err
		}
	case syscall.S_IFCHR, syscall.S_IFBLK, syscall.S_IFIFO:
		if err := unix.Mknod(p, n.typ|n.mode, int(n.rdev)); err != nil {
			return err
		}
	default:
		return fmt.Errorf("type %o", n.typ)
	}
	if n.isDir() {
		return nil
	}
	return setAttrs(n, p)
}

// setAttrs gives p n's owner, xattrs, mode and mtime, in the order
// containerd's applier does: chown before chmod, which chown would clear
// setuid and setgid from.
func setAttrs(n *inode, p string) error {
	if err := os.Lchown(p, int(n.uid), int(n.gid)); err != nil {
		return err
	}
	for _, k := range n.xattrNames() {
		if err := unix.Lsetxattr(p, k, n.xattrs[k], 0); err != nil {
			return fmt.Errorf("xattr %s: %w", k, err)
		}
	}
	if n.typ != syscall.S_IFLNK {
		if err := unix.Fchmodat(unix.AT_FDCWD, p, n.mode, 0); err != nil {
			return err
		}
	}
	ts := unix.NsecToTimespec(n.mtime.UnixNano())
	if n.mtime.IsZero() {
		ts = unix.Timespec{}
	}
	err := unix.UtimesNanoAt(unix.AT_FDCWD, p, []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("mtime %v: %w", n.mtime, err)
	}
	return err
}
