//go:build linux

package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	continuityfs "github.com/containerd/continuity/fs"
	"github.com/containerd/continuity/sysx"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// LayerChainDeps is optionally implemented by a Layers whose directories
// show a layer as containerd's applier unpacks it on its own, when part of
// that unpacking depends on the layers below it (see ChainDeps). The
// snapshotter then corrects each remote layer for its place in the chain:
// it stacks, just above the layer's directory, a small directory of its
// own (the layer's "chain fix", kept with the committed snapshot) holding
// the directories whose attributes differ and the whiteouts that hide what
// the unpacking would not have. It must be cheap: it is asked at every
// mount.
type LayerChainDeps interface {
	ChainDeps(ctx context.Context, layer digest.Digest) (*ChainDeps, error)
}

// ChainDeps lists what containerd's unpacking of a layer takes from the
// layers below it.
type ChainDeps struct {
	// Implicit are the directories the layer's entries did not declare
	// before their contents, parents first. containerd's applier
	// (archive.WithParents) creates such a directory with the owner,
	// mode, mtime and non-trusted xattrs of the same path in the nearest
	// lower layer that has something there, if that is a directory, and
	// 0755 root:root otherwise, which the layer directory shows.
	Implicit []ImplicitDir
	// Whiteouts are the layer directory's whiteouts. A layer without
	// parents is unpacked without whiteout conversion and has none.
	Whiteouts []string
	// BaseRemoved is what the layer directory has but the unpacking of the
	// layer without parents removes.
	BaseRemoved []string
}

// ImplicitDir is a directory a layer created as a missing parent.
type ImplicitDir struct {
	Path string
	// Declared: an entry declared it later, so its owner, mode and mtime
	// are the entry's and its xattrs add to the copied ones.
	Declared bool
	// ChainParent: it was made while its parent was implicit too, so
	// when nothing is copied to it, it has its parent's group if the
	// parent (as the chain makes it) is setgid.
	ChainParent bool
}

func (d *ChainDeps) empty() bool {
	return d == nil || len(d.Implicit) == 0 && len(d.Whiteouts) == 0 && len(d.BaseRemoved) == 0
}

// withChainFixes inserts the chain fix of each remote layer of chain
// above its directory in dirs (nearest parent first) and returns the
// overlay lower directories.
func (o *snapshotter) withChainFixes(ctx context.Context, chain []lower, dirs []string) ([]string, error) {
	cd, ok := o.layers.(LayerChainDeps)
	if !ok {
		return dirs, nil
	}
	fixes := make([]string, len(chain))
	for i := len(chain) - 1; i >= 0; i-- {
		if chain[i].layer == "" {
			continue
		}
		fix, err := o.chainFix(ctx, cd, chain, dirs, fixes, i)
		if err != nil {
			return nil, fmt.Errorf("layer %s in its chain: %w", chain[i].layer, err)
		}
		fixes[i] = fix
	}
	out := make([]string, 0, len(dirs))
	for i, d := range dirs {
		if fixes[i] != "" {
			out = append(out, fixes[i])
		}
		out = append(out, d)
	}
	return out, nil
}

// chainFix returns the chain fix of chain[i] ("" when it needs none),
// building it the first time. It lives in the remote snapshot's own
// directory, so it goes with the snapshot: the chain under a committed
// snapshot never changes.
func (o *snapshotter) chainFix(ctx context.Context, cd LayerChainDeps, chain []lower, dirs, fixes []string, i int) (string, error) {
	sdir := filepath.Join(o.root, "snapshots", chain[i].id)
	done := filepath.Join(sdir, "chain")
	if _, err := os.Stat(filepath.Join(done, "none")); err == nil {
		return "", nil
	}
	if _, err := os.Stat(filepath.Join(done, "fs")); err == nil {
		return filepath.Join(done, "fs"), nil
	}
	deps, err := cd.ChainDeps(ctx, chain[i].layer)
	if err != nil {
		return "", err
	}
	if deps.empty() {
		return "", nil
	}
	var below []chainLower
	for j := i + 1; j < len(chain); j++ {
		below = append(below, chainLower{dir: dirs[j], fix: fixes[j], remoteBase: j == len(chain)-1 && chain[j].layer != ""})
	}
	plan, err := planChainFix(dirs[i], deps, below)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(sdir, 0o700); err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(sdir, "chain-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	if plan.empty() {
		if err := os.WriteFile(filepath.Join(tmp, "none"), nil, 0o600); err != nil {
			return "", err
		}
	} else if err := plan.write(filepath.Join(tmp, "fs"), dirs[i]); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, done); err != nil && !errors.Is(err, os.ErrExist) && !errors.Is(err, syscall.ENOTEMPTY) {
		return "", err
	}
	// Ours, or the one a concurrent mount renamed first: they are equal.
	if plan.empty() {
		return "", nil
	}
	return filepath.Join(done, "fs"), nil
}

// chainLower is a layer below the one being fixed, as containerd's
// applier would have seen it.
type chainLower struct {
	dir string // its directory (a remote view, or a local layer)
	fix string // its chain fix, if any
	// remoteBase: a remote layer at the bottom of the chain, whose
	// directory has whiteouts that containerd's unpacking has not.
	remoteBase bool
}

// dirAttrs are what containerd's applier copies from a lower directory.
type dirAttrs struct {
	uid, gid uint32
	mode     uint32 // permissions with setuid, setgid, sticky
	mtime    unix.Timespec
	xattrs   map[string][]byte
}

func (a *dirAttrs) equal(b *dirAttrs) bool {
	return a.uid == b.uid && a.gid == b.gid && a.mode == b.mode && maps.EqualFunc(a.xattrs, b.xattrs, func(x, y []byte) bool { return string(x) == string(y) })
}

// chainFixPlan is the content of a chain fix: directories (with the
// attributes they must show) and whiteouts.
type chainFixPlan struct {
	dirs      map[string]*dirAttrs // nil: the layer directory's own attributes
	whiteouts []string
}

func (p *chainFixPlan) empty() bool { return len(p.dirs) == 0 && len(p.whiteouts) == 0 }

func planChainFix(view string, deps *ChainDeps, below []chainLower) (*chainFixPlan, error) {
	p := &chainFixPlan{dirs: map[string]*dirAttrs{}}
	if len(below) == 0 {
		// The base layer: containerd unpacked it without whiteout
		// conversion. A directory of the fix above the view's makes the
		// directory merged, and overlayfs then hides the view's
		// whiteouts; a whiteout of the fix hides what was removed.
		for _, w := range deps.Whiteouts {
			p.need(parentPath(w))
		}
		for _, r := range deps.BaseRemoved {
			p.need(parentPath(r))
			p.whiteouts = append(p.whiteouts, r)
		}
	}
	// Parents come first: a directory made in a setgid directory takes
	// its group, from the parent as it was then (atCreation).
	atCreation := map[string]*dirAttrs{}
	for _, d := range deps.Implicit {
		own, err := readDirAttrs(filepath.Join(view, d.Path))
		if err != nil {
			return nil, err
		}
		copied, err := lowerDirAttrs(d.Path, below)
		if err != nil {
			return nil, fmt.Errorf("directory %q: %w", d.Path, err)
		}
		made := copied
		if made == nil {
			// mkdir 0755 by root; the view knows a declared parent.
			made = &dirAttrs{mode: 0o755, gid: own.gid, mtime: own.mtime}
			if d.ChainParent {
				made.gid = 0
				if parent := atCreation[parentPath(d.Path)]; parent != nil && parent.mode&unix.S_ISGID != 0 {
					made.gid = parent.gid
				}
			}
		}
		atCreation[d.Path] = made
		want := &dirAttrs{uid: made.uid, gid: made.gid, mode: made.mode, mtime: made.mtime, xattrs: maps.Clone(made.xattrs)}
		if want.xattrs == nil {
			want.xattrs = map[string][]byte{}
		}
		if d.Declared {
			want.uid, want.gid, want.mode, want.mtime = own.uid, own.gid, own.mode, own.mtime
			maps.Copy(want.xattrs, own.xattrs)
		}
		if !want.equal(own) {
			p.dirs[d.Path] = want
		}
	}
	return p, nil
}

// need records a directory the fix must have, with the view's attributes
// unless the fix changes them.
func (p *chainFixPlan) need(dir string) {
	if _, ok := p.dirs[dir]; !ok {
		p.dirs[dir] = nil
	}
}

func parentPath(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[:i]
	}
	return ""
}

// lowerDirAttrs returns what containerd's applier copies to a missing
// parent at rel from the layers below (archive's mkparent): the attributes
// of the first lower layer that has something at rel (resolving symlinks
// inside that layer) if it is a directory, nil otherwise.
func lowerDirAttrs(rel string, below []chainLower) (*dirAttrs, error) {
	for _, l := range below {
		rp, err := continuityfs.RootPath(l.dir, rel)
		if err != nil {
			return nil, err
		}
		var st unix.Stat_t
		if err := unix.Lstat(rp, &st); errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
			continue
		} else if err != nil {
			return nil, err
		}
		r, err := filepath.Rel(l.dir, rp)
		if err != nil {
			return nil, err
		}
		if l.fix != "" {
			var fst unix.Stat_t
			if err := unix.Lstat(filepath.Join(l.fix, r), &fst); err == nil {
				if isWhiteout(&fst) {
					continue // removed from that layer
				}
				if fst.Mode&unix.S_IFMT == unix.S_IFDIR {
					return readDirAttrs(filepath.Join(l.fix, r))
				}
			}
		}
		if l.remoteBase && isWhiteout(&st) {
			continue
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			return nil, nil
		}
		return readDirAttrs(rp)
	}
	return nil, nil
}

func isWhiteout(st *unix.Stat_t) bool {
	return st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0
}

// readDirAttrs reads a directory's owner, mode, mtime and xattrs but the
// trusted ones, which containerd's applier does not copy (and which hold
// overlayfs' own markers).
func readDirAttrs(p string) (*dirAttrs, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return nil, err
	}
	a := &dirAttrs{uid: st.Uid, gid: st.Gid, mode: st.Mode & 0o7777, mtime: st.Mtim, xattrs: map[string][]byte{}}
	names, err := sysx.LListxattr(p)
	if err != nil && !errors.Is(err, unix.ENOTSUP) {
		return nil, fmt.Errorf("listing xattrs of %s: %w", p, err)
	}
	for _, k := range names {
		if strings.HasPrefix(k, "trusted.") {
			continue
		}
		v, err := sysx.LGetxattr(p, k)
		if err != nil {
			return nil, fmt.Errorf("reading xattr %s of %s: %w", k, p, err)
		}
		a.xattrs[k] = v
	}
	return a, nil
}

// write creates the fix at dst: every planned directory with its
// ancestors (those with the view's attributes, as the root), and the
// whiteouts.
func (p *chainFixPlan) write(dst, view string) error {
	paths := []string{""}
	for d := range p.dirs {
		for a := d; a != ""; a = parentPath(a) {
			paths = append(paths, a)
		}
	}
	for _, w := range p.whiteouts {
		for a := parentPath(w); a != ""; a = parentPath(a) {
			paths = append(paths, a)
		}
	}
	sort.Strings(paths)
	paths = compactStrings(paths)
	attrs := make([]*dirAttrs, len(paths))
	for i, d := range paths {
		a := p.dirs[d]
		if a == nil {
			var err error
			if a, err = readDirAttrs(filepath.Join(view, d)); err != nil {
				return err
			}
		}
		attrs[i] = a
		target := filepath.Join(dst, d)
		if err := os.Mkdir(target, 0o700); err != nil {
			return err
		}
		if err := os.Lchown(target, int(a.uid), int(a.gid)); err != nil {
			return err
		}
		for k, v := range a.xattrs {
			if err := unix.Lsetxattr(target, k, v, 0); err != nil {
				return fmt.Errorf("setting xattr %s on %s: %w", k, target, err)
			}
		}
	}
	for _, w := range p.whiteouts {
		if err := unix.Mknod(filepath.Join(dst, w), unix.S_IFCHR, 0); err != nil {
			return fmt.Errorf("whiteout %q: %w", w, err)
		}
	}
	// Modes and mtimes last, deepest first: a directory without write
	// permission or whose mtime was set still gets its contents.
	for i := len(paths) - 1; i >= 0; i-- {
		target, a := filepath.Join(dst, paths[i]), attrs[i]
		if err := unix.Chmod(target, a.mode); err != nil {
			return err
		}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, target, []unix.Timespec{a.mtime, a.mtime}, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return err
		}
	}
	return nil
}

func compactStrings(s []string) []string {
	out := s[:0]
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}
