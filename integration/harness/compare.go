package harness

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// FileInfo is what the comparator records about one path of a tree.
type FileInfo struct {
	Path   string // relative to the root, "/" for the root itself
	Type   string // reg, dir, symlink, char, block, fifo, socket
	Mode   uint32 // permission bits incl. setuid/setgid/sticky
	UID    uint32
	GID    uint32
	Size   int64  // regular files only
	SHA256 string // regular files only
	Link   string // symlink target
	Major  uint32 // devices only
	Minor  uint32
	Xattrs map[string]string
	// HardLinks lists the other paths of the tree that are the same inode.
	HardLinks []string
}

// CompareOptions tune CompareTrees.
type CompareOptions struct {
	// IgnoreRoot names entries directly under the root that one side may
	// have and the other not (eStargz's stargz.index.json...).
	IgnoreRoot []string
}

// EStargzRootFiles are the metadata files that eStargz adds at the root of
// every converted layer; a plain overlayfs unpack shows them.
var EStargzRootFiles = []string{"stargz.index.json", ".no.prefetch.landmark", ".prefetch.landmark"}

// ignoredXattr reports xattrs that belong to the filesystem rather than the
// image: overlayfs' own bookkeeping.
func ignoredXattr(name string) bool {
	return strings.HasPrefix(name, "trusted.overlay.") || strings.HasPrefix(name, "user.overlay.")
}

// ScanTree walks root without following symlinks and records every entry.
func ScanTree(root string, opts CompareOptions) (map[string]*FileInfo, error) {
	ignore := map[string]bool{}
	for _, n := range opts.IgnoreRoot {
		ignore[n] = true
	}
	out := map[string]*FileInfo{}
	type inodeKey struct{ dev, ino uint64 }
	inodes := map[inodeKey][]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rel = "/" + filepath.ToSlash(rel)
		if rel == "/." {
			rel = "/"
		}
		if filepath.Dir(rel) == "/" && ignore[filepath.Base(rel)] {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		fi, err := scanOne(p, rel)
		if err != nil {
			return err
		}
		out[rel] = fi
		if fi.Type != "dir" {
			var st unix.Stat_t
			if err := unix.Lstat(p, &st); err == nil && st.Nlink > 1 {
				k := inodeKey{st.Dev, st.Ino}
				inodes[k] = append(inodes[k], rel)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("scan %s: %w", root, err)
	}
	for _, paths := range inodes {
		if len(paths) < 2 {
			continue
		}
		sort.Strings(paths)
		for _, p := range paths {
			for _, q := range paths {
				if q != p {
					out[p].HardLinks = append(out[p].HardLinks, q)
				}
			}
		}
	}
	return out, nil
}

func scanOne(p, rel string) (*FileInfo, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return nil, fmt.Errorf("lstat %s: %w", rel, err)
	}
	fi := &FileInfo{Path: rel, Mode: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		fi.Type = "reg"
		fi.Size = st.Size
		sum, err := fileSHA256(p)
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", rel, err)
		}
		fi.SHA256 = sum
	case unix.S_IFDIR:
		fi.Type = "dir"
	case unix.S_IFLNK:
		fi.Type = "symlink"
		l, err := os.Readlink(p)
		if err != nil {
			return nil, fmt.Errorf("readlink %s: %w", rel, err)
		}
		fi.Link = l
	case unix.S_IFCHR:
		fi.Type = "char"
		fi.Major, fi.Minor = unix.Major(st.Rdev), unix.Minor(st.Rdev)
	case unix.S_IFBLK:
		fi.Type = "block"
		fi.Major, fi.Minor = unix.Major(st.Rdev), unix.Minor(st.Rdev)
	case unix.S_IFIFO:
		fi.Type = "fifo"
	case unix.S_IFSOCK:
		fi.Type = "socket"
	default:
		fi.Type = fmt.Sprintf("unknown(%o)", st.Mode&unix.S_IFMT)
	}
	xattrs, err := listXattrs(p)
	if err != nil {
		return nil, fmt.Errorf("xattrs of %s: %w", rel, err)
	}
	fi.Xattrs = xattrs
	return fi, nil
}

func fileSHA256(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func listXattrs(p string) (map[string]string, error) {
	size, err := unix.Llistxattr(p, nil)
	if errors.Is(err, unix.ENOTSUP) {
		return nil, nil
	}
	if err != nil || size == 0 {
		return nil, err
	}
	buf := make([]byte, size)
	size, err = unix.Llistxattr(p, buf)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, name := range bytes.Split(buf[:size], []byte{0}) {
		n := string(name)
		if n == "" || ignoredXattr(n) {
			continue
		}
		vsize, err := unix.Lgetxattr(p, n, nil)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s: %w", n, err)
		}
		val := make([]byte, vsize)
		vsize, err = unix.Lgetxattr(p, n, val)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s: %w", n, err)
		}
		out[n] = string(val[:vsize])
	}
	if len(out) == 0 {
		return nil, nil
	}
	return out, nil
}

// CompareTrees compares the trees at a and b: type, mode (incl. setuid),
// owner, size, content, link target, xattrs, device numbers and hard-link
// groups. It returns a readable diff, empty when they are equal.
func CompareTrees(a, b string, opts CompareOptions) (string, error) {
	ta, err := ScanTree(a, opts)
	if err != nil {
		return "", err
	}
	tb, err := ScanTree(b, opts)
	if err != nil {
		return "", err
	}
	return DiffTrees(ta, tb), nil
}

// DiffTrees describes the differences between two scanned trees, "A" and
// "B", at most 200 lines.
func DiffTrees(ta, tb map[string]*FileInfo) string {
	paths := map[string]bool{}
	for p := range ta {
		paths[p] = true
	}
	for p := range tb {
		paths[p] = true
	}
	var lines []string
	for _, p := range sortedKeys(paths) {
		fa, fb := ta[p], tb[p]
		switch {
		case fb == nil:
			lines = append(lines, fmt.Sprintf("only in A: %s (%s)", p, fa.Type))
		case fa == nil:
			lines = append(lines, fmt.Sprintf("only in B: %s (%s)", p, fb.Type))
		default:
			for _, d := range diffInfo(fa, fb) {
				lines = append(lines, p+": "+d)
			}
		}
	}
	if len(lines) > 200 {
		lines = append(lines[:200], fmt.Sprintf("... and %d more differences", len(lines)-200))
	}
	return strings.Join(lines, "\n")
}

func diffInfo(a, b *FileInfo) []string {
	var d []string
	field := func(name string, va, vb any) {
		if fmt.Sprint(va) != fmt.Sprint(vb) {
			d = append(d, fmt.Sprintf("%s A=%v B=%v", name, va, vb))
		}
	}
	field("type", a.Type, b.Type)
	field("mode", fmt.Sprintf("%04o", a.Mode), fmt.Sprintf("%04o", b.Mode))
	field("uid", a.UID, b.UID)
	field("gid", a.GID, b.GID)
	if a.Type == "reg" && b.Type == "reg" {
		field("size", a.Size, b.Size)
		field("sha256", a.SHA256, b.SHA256)
	}
	field("link", a.Link, b.Link)
	field("device", fmt.Sprintf("%d:%d", a.Major, a.Minor), fmt.Sprintf("%d:%d", b.Major, b.Minor))
	for _, k := range sortedKeys(mergeKeys(a.Xattrs, b.Xattrs)) {
		va, oka := a.Xattrs[k]
		vb, okb := b.Xattrs[k]
		if oka != okb || va != vb {
			d = append(d, fmt.Sprintf("xattr %s A=%q B=%q", k, va, vb))
		}
	}
	field("hardlinks", a.HardLinks, b.HardLinks)
	return d
}

func mergeKeys(a, b map[string]string) map[string]bool {
	m := map[string]bool{}
	for k := range a {
		m[k] = true
	}
	for k := range b {
		m[k] = true
	}
	return m
}
