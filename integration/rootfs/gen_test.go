package rootfs

import (
	"archive/tar"
	"fmt"
	"math/rand"
	"path"
	"sort"
	"strings"
	"time"
)

// The generator writes random layer stacks that containerd's applier
// accepts: the cases the property test is about (hard links whose headers
// disagree with their targets, directories declared again with other or
// equal attributes, directories created implicitly over a lower one,
// opaque directories, whiteouts of hard-linked and re-declared entries,
// symlink chains, devices, fifos, xattrs on every type, setuid, setgid and
// sticky bits, long and non-UTF-8 names) come up in every batch. It keeps a
// model of the merged tree only to pick meaningful targets; what the tree
// really is, is containerd's business: the test compares against it.

type kind int

const (
	kDir kind = iota
	kReg
	kSymlink
	kChar
	kBlock
	kFifo
	kWhiteout
)

// layerEntry is one tar entry of a generated layer.
type layerEntry struct {
	hdr  tar.Header
	data []byte
}

// genOptions select what the generator may produce.
type genOptions struct {
	nonUTF8 bool // names and symlink targets that are not valid UTF-8
}

// stackGen generates the layers of one stack, under its own root directory
// (prefix) so that several stacks can share one image.
type stackGen struct {
	r      *rand.Rand
	prefix string
	opts   genOptions

	// merged is the model of the merged tree after the layers so far,
	// keyed by path relative to the stack root ("" is the root).
	merged map[string]kind
	// dirAttrs holds the last declared header of merged directories.
	dirAttrs map[string]tar.Header
	// everNonDir holds the paths some earlier layer has a non-directory
	// at (whiteouts included).
	everNonDir map[string]bool
	// symTarget holds, for symlinks to a path of the stack (or nowhere),
	// that path.
	symTarget map[string]string
	index     int      // the layer being generated
	contents  [][]byte // earlier contents, reused to share digests
}

// layerGen is the state of the layer being generated: what containerd's
// applier will have put in the layer's own (upper) directory.
type layerGen struct {
	upper    map[string]kind // entries, implicit parents (kDir), whiteouts
	explicit map[string]bool // directories with a header in this layer
	linkable []string        // non-directories created in this layer
	linked   map[string]bool // hard link targets: never redefined
	opaque   map[string]bool
	unpacked map[string]bool // paths an entry of the layer created
	everDir  map[string]bool // paths a directory entry of the layer named
	dirHdr   map[string]tar.Header
	entries  []layerEntry
}

func newStackGen(seed int64, prefix string, opts genOptions) *stackGen {
	return &stackGen{
		r: rand.New(rand.NewSource(seed)), prefix: prefix, opts: opts,
		merged: map[string]kind{"": kDir}, dirAttrs: map[string]tar.Header{}, everNonDir: map[string]bool{},
		symTarget: map[string]string{},
	}
}

// layers generates the stack: 1 to 4 layers of entries, each with names
// relative to the image root (prefix included).
func (g *stackGen) layers() [][]layerEntry {
	n := 1 + g.r.Intn(4)
	out := make([][]layerEntry, n)
	for i := range out {
		g.index = i
		out[i] = g.layer(i)
	}
	return out
}

var (
	uids      = []int{0, 0, 0, 1, 2, 33, 1000, 1001, 65534, 123456}
	fileModes = []int64{0o644, 0o644, 0o600, 0o755, 0o4755, 0o2755, 0o6755, 0o1644, 0o000, 0o444, 0o640, 0o7777}
	dirModes  = []int64{0o755, 0o755, 0o750, 0o700, 0o1777, 0o2775, 0o555, 0o711, 0o4755, 0o000}
	devModes  = []int64{0o660, 0o666, 0o600, 0o644, 0o4660, 0o000}
	linkModes = []int64{0o777, 0o644, 0o755, 0o000}
)

func (g *stackGen) pick(xs []int64) int64 { return xs[g.r.Intn(len(xs))] }

func (g *stackGen) layer(index int) []layerEntry {
	l := &layerGen{upper: map[string]kind{}, explicit: map[string]bool{}, linked: map[string]bool{}, opaque: map[string]bool{},
		unpacked: map[string]bool{}, everDir: map[string]bool{}, dirHdr: map[string]tar.Header{}}
	if index == 0 || g.r.Intn(3) == 0 {
		// The stack root: declared in the base layer, sometimes again.
		g.dir(l, "")
	}
	ops := 3 + g.r.Intn(14)
	for i := 0; i < ops; i++ {
		g.op(l, index)
	}
	g.commit(l)
	return l.entries
}

// op adds one random operation to the layer.
func (g *stackGen) op(l *layerGen, index int) {
	switch w := g.r.Intn(100); {
	case w < 12: // a new directory
		if p, ok := g.newPath(l); ok {
			g.dir(l, p)
		}
	case w < 20: // a lower directory declared again, or this layer's
		if p, ok := g.pickDir(l); ok {
			g.dir(l, p)
		}
	case w < 40: // a new regular file
		if p, ok := g.newPath(l); ok {
			g.file(l, p)
		}
	case w < 46: // a lower non-directory replaced
		if p, ok := g.pickLower(l, func(k kind) bool { return k != kDir }); ok {
			g.anyType(l, p)
		}
	case w < 58: // a hard link to something of this layer
		if len(l.linkable) == 0 {
			g.op(l, index)
			return
		}
		target := l.linkable[g.r.Intn(len(l.linkable))]
		if p, ok := g.newPath(l); ok {
			g.hardlink(l, p, target)
		}
	case w < 68: // a symlink
		if p, ok := g.newPath(l); ok {
			g.symlink(l, p)
		}
	case w < 74: // a device or a fifo
		if p, ok := g.newPath(l); ok {
			g.special(l, p)
		}
	case w < 86: // a whiteout of a lower entry
		if index == 0 {
			// Whiteouts in a base layer hide nothing; they still
			// must not show.
			if p, ok := g.newPath(l); ok {
				g.whiteout(l, p)
			}
			return
		}
		// Not in a directory this layer makes opaque: overlayfs lists
		// such a redundant whiteout in a directory only one layer has,
		// and a chain fix merges that directory (ARCHITECTURE.md).
		if p, ok := g.pickLower(l, func(kind) bool { return true }); ok && p != "" && !opaqueAbove(l, p) {
			g.whiteout(l, p)
		}
	case w < 92: // an opaque directory
		if p, ok := g.pickDir(l); ok && !l.opaque[p] {
			if index == 0 && !g.baseOpaque(l, p) || index > 0 && hasWhiteoutIn(l, p) {
				return
			}
			g.ensureParents(l, p+"/x")
			if _, ok := l.upper[p]; !ok {
				l.upper[p] = kDir
			}
			l.opaque[p] = true
			g.emit(l, tar.Header{Typeflag: tar.TypeReg, Name: g.full(path.Join(p, ".wh..wh..opq")), Mode: 0o644, ModTime: g.mtime()}, nil)
		}
	case w < 96: // an entry of this layer replaced in the same layer
		if p, ok := g.pickUpper(l); ok {
			if l.everDir[p] {
				// Not by a symlink: the applier resolves declared
				// directories again once the layer is applied.
				g.file(l, p)
			} else {
				g.anyType(l, p)
			}
		}
	default: // something below a lower symlink: the applier makes it a directory
		// and copies the attributes of what the symlink points at, if
		// that resolves without crossing a non-directory (ENOTDIR).
		if p, ok := g.pickLower(l, func(k kind) bool { return k == kSymlink }); ok && g.safeTarget(p) {
			g.file(l, path.Join(p, g.name()))
		}
	}
}

// full returns the name of p in the image.
func (g *stackGen) full(p string) string {
	if p == "" {
		return g.prefix
	}
	return g.prefix + "/" + p
}

func (g *stackGen) mtime() time.Time {
	return time.Unix(946684800+g.r.Int63n(1<<30), 0)
}

func (g *stackGen) owner(h *tar.Header) {
	h.Uid, h.Gid = uids[g.r.Intn(len(uids))], uids[g.r.Intn(len(uids))]
}

// xattrs gives h random xattrs: user.* (which the kernel refuses on
// anything but regular files and directories), security.*, and trusted.*
// (which containerd's applier refuses).
func (g *stackGen) xattrs(h *tar.Header) {
	if g.r.Intn(3) != 0 {
		return
	}
	h.PAXRecords = map[string]string{}
	for _, k := range []string{"user.sl.a", "user.sl.b", "security.sl", "trusted.sl"} {
		if g.r.Intn(3) == 0 {
			v := make([]byte, 1+g.r.Intn(12))
			g.r.Read(v)
			h.PAXRecords["SCHILY.xattr."+k] = string(v)
		}
	}
	h.Format = tar.FormatPAX
}

// name returns a new file name: short, with spaces and non-ASCII letters,
// long (beyond the 100 bytes of a ustar name), or not UTF-8.
func (g *stackGen) name() string {
	const letters = "abcdefghijklmnopqrstuvwxyz0123456789-_."
	short := func(n int) string {
		b := make([]byte, n)
		for i := range b {
			b[i] = letters[g.r.Intn(len(letters))]
		}
		s := string(b)
		if strings.HasPrefix(s, ".") {
			s = "n" + s // never ".", "..", a whiteout or a metadata name
		}
		return s
	}
	switch w := g.r.Intn(100); {
	case w < 75:
		return short(1 + g.r.Intn(8))
	case w < 83:
		return "sp ace ü ñ " + short(3)
	case w < 91:
		return "long-" + short(100+g.r.Intn(150))
	default:
		if g.opts.nonUTF8 {
			return "bin-\xff\xfe" + short(2) + "\x80"
		}
		return short(1 + g.r.Intn(8))
	}
}

// blocked reports whether p cannot be created or used as a parent in this
// layer: p or one of its ancestors is a non-directory in the layer's own
// directory (the applier would fail with ENOTDIR or EEXIST; conversion
// refuses entries below a symlink of the layer).
func (g *stackGen) blocked(l *layerGen, p string) bool {
	for a := p; ; a = parentOf(a) {
		if k, ok := l.upper[a]; ok && k != kDir {
			return true
		}
		if a == "" {
			return false
		}
	}
}

func parentOf(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[:i]
	}
	return ""
}

// dirs lists the directories an entry may go into.
func (g *stackGen) dirs(l *layerGen) []string {
	var out []string
	for p, k := range g.merged {
		if k == kDir && !g.blocked(l, p) {
			out = append(out, p)
		}
	}
	for p, k := range l.upper {
		if _, ok := g.merged[p]; !ok && k == kDir && !g.blocked(l, p) {
			out = append(out, p)
		}
	}
	sort.Strings(out)
	return out
}

func (g *stackGen) pickDir(l *layerGen) (string, bool) {
	ds := g.dirs(l)
	if len(ds) == 0 {
		return "", false
	}
	return ds[g.r.Intn(len(ds))], true
}

// newPath returns a path that exists nowhere yet, in a random directory
// (sometimes a new subdirectory nobody declares).
func (g *stackGen) newPath(l *layerGen) (string, bool) {
	parent, ok := g.pickDir(l)
	if !ok {
		return "", false
	}
	if g.r.Intn(6) == 0 {
		parent = path.Join(parent, g.name()) // an implicit new directory
	}
	for i := 0; i < 5; i++ {
		p := path.Join(parent, g.name())
		_, inMerged := g.merged[p]
		_, inUpper := l.upper[p]
		if !inMerged && !inUpper && !g.blocked(l, p) && len(g.full(p)) < 1000 {
			return p, true
		}
	}
	return "", false
}

// pickLower returns a path of the lower layers that this layer has not
// touched, whose kind matches.
func (g *stackGen) pickLower(l *layerGen, match func(kind) bool) (string, bool) {
	var ps []string
	for p, k := range g.merged {
		if _, ok := l.upper[p]; !ok && match(k) && !g.blocked(l, p) {
			ps = append(ps, p)
		}
	}
	if len(ps) == 0 {
		return "", false
	}
	sort.Strings(ps)
	return ps[g.r.Intn(len(ps))], true
}

// pickUpper returns an entry of this layer that can be replaced: not a
// hard link target (conversion refuses those), not a whiteout.
func (g *stackGen) pickUpper(l *layerGen) (string, bool) {
	var ps []string
	for p, k := range l.upper {
		if p != "" && k != kWhiteout && !l.linked[p] && (k != kDir || l.explicit[p] && !hasDeclaredDescendant(l, p)) && !g.blocked(l, parentOf(p)) {
			ps = append(ps, p)
		}
	}
	if len(ps) == 0 {
		return "", false
	}
	sort.Strings(ps)
	return ps[g.r.Intn(len(ps))], true
}

// baseOpaque applies an opaque marker of d in a base layer to the model.
// containerd unpacks a base layer without overlayfs' whiteout conversion:
// the marker removes what is in d but was not created by an entry of the
// layer so far, that is the directories made as missing parents, with
// everything in them. It reports false (and changes nothing) when that
// would remove a declared directory (the applier then fails to set its
// mtime) or a name of a hard-linked inode: the link count of the other
// names would change, which the correction of a layer's view in a chain
// cannot express (ARCHITECTURE.md, "A layer's view in its chain").
func (g *stackGen) baseOpaque(l *layerGen, d string) bool {
	var removed []string
	for q := range l.upper {
		if !strings.HasPrefix(q, d+"/") && !(d == "" && q != "") {
			continue
		}
		for a := q; a != d; a = parentOf(a) {
			if !l.unpacked[a] {
				removed = append(removed, q)
				break
			}
		}
	}
	for _, q := range removed {
		if l.explicit[q] || l.everDir[q] || l.linked[q] {
			return false
		}
	}
	for _, q := range removed {
		delete(l.upper, q)
	}
	refreshLinkable(l)
	return true
}

// hasWhiteoutIn reports whether the layer whites out something below d.
func hasWhiteoutIn(l *layerGen, d string) bool {
	for q, k := range l.upper {
		if k == kWhiteout && (d == "" || strings.HasPrefix(q, d+"/")) {
			return true
		}
	}
	return false
}

// opaqueAbove reports whether the layer makes a directory above p opaque.
func opaqueAbove(l *layerGen, p string) bool {
	for a := parentOf(p); ; a = parentOf(a) {
		if l.opaque[a] {
			return true
		}
		if a == "" {
			return false
		}
	}
}

// hasDeclaredDescendant reports whether a directory of this layer holds a
// directory declared in it: the applier sets the mtime of every declared
// directory once the layer is applied, and fails if one was removed.
// It also reports a hard link target below p: conversion refuses a layer
// that removes the target of a hard link whose other names stay.
func hasDeclaredDescendant(l *layerGen, p string) bool {
	for q := range l.everDir {
		if strings.HasPrefix(q, p+"/") {
			return true
		}
	}
	for q := range l.linked {
		if strings.HasPrefix(q, p+"/") {
			return true
		}
	}
	return false
}

// ensureParents records the directories the applier creates for an entry
// at p, and sometimes declares them.
func (g *stackGen) ensureParents(l *layerGen, p string) {
	var missing []string
	for a := parentOf(p); ; a = parentOf(a) {
		if _, ok := l.upper[a]; !ok {
			missing = append(missing, a)
		}
		if a == "" {
			break
		}
	}
	// containerd's applier looks for a missing parent in every lower
	// layer, and fails (ENOTDIR) where one has a non-directory above it:
	// such parents are declared.
	declare := false
	for _, a := range missing {
		for b := parentOf(a); a != "" && !declare; b = parentOf(b) {
			declare = g.everNonDir[b]
			if b == "" {
				break
			}
		}
	}
	for i := len(missing) - 1; i >= 0; i-- {
		a := missing[i]
		if a != "" && (declare || g.r.Intn(3) == 0) {
			g.dir(l, a)
		} else {
			l.upper[a] = kDir
		}
	}
}

func (g *stackGen) emit(l *layerGen, h tar.Header, data []byte) {
	if !strings.Contains(path.Base(h.Name), ".wh.") {
		p := strings.TrimPrefix(strings.TrimPrefix(h.Name, g.prefix), "/")
		l.unpacked[strings.TrimSuffix(p, "/")] = true
	}
	if h.Typeflag == tar.TypeDir && !strings.HasSuffix(h.Name, "/") {
		h.Name += "/"
	}
	h.Size = int64(len(data))
	l.entries = append(l.entries, layerEntry{hdr: h, data: data})
}

// dir declares the directory p, with attributes equal to the lower
// declaration (when there is one, half of the time) or new ones.
func (g *stackGen) dir(l *layerGen, p string) {
	g.ensureParents(l, p)
	h := tar.Header{Typeflag: tar.TypeDir, Name: g.full(p), ModTime: g.mtime()}
	if old, ok := g.dirAttrs[p]; ok && g.r.Intn(2) == 0 {
		h.Mode, h.Uid, h.Gid, h.PAXRecords, h.Format = old.Mode, old.Uid, old.Gid, old.PAXRecords, old.Format
	} else {
		h.Mode = g.pick(dirModes)
		g.owner(&h)
		g.xattrs(&h)
	}
	if prev, ok := l.dirHdr[p]; ok && l.explicit[p] {
		// Declared twice in one layer: conversion keeps one entry,
		// with the later attributes. Directories made in it in
		// between took its group if it was setgid; that must not
		// change (convert/normalize.go).
		h.Mode = h.Mode&^0o2000 | prev.Mode&0o2000
		if prev.Mode&0o2000 != 0 {
			h.Gid = prev.Gid
		}
	}
	l.dirHdr[p] = h
	l.upper[p] = kDir
	l.explicit[p] = true
	l.everDir[p] = true
	refreshLinkable(l)
	g.emit(l, h, nil)
}

func (g *stackGen) content() []byte {
	if len(g.contents) > 0 && g.r.Intn(6) == 0 {
		return g.contents[g.r.Intn(len(g.contents))]
	}
	var n int
	switch w := g.r.Intn(100); {
	case w < 20:
		return nil
	case w < 70:
		n = 1 + g.r.Intn(200)
	case w < 75:
		n = chunkSize
	default:
		n = chunkSize + 1 + g.r.Intn(2*chunkSize)
	}
	b := make([]byte, n)
	for i := range b {
		b[i] = "starlight layer chunk \n\x00\xff"[g.r.Intn(25)]
	}
	g.contents = append(g.contents, b)
	return b
}

func (g *stackGen) file(l *layerGen, p string) {
	g.ensureParents(l, p)
	h := tar.Header{Typeflag: tar.TypeReg, Name: g.full(p), Mode: g.pick(fileModes), ModTime: g.mtime()}
	g.owner(&h)
	g.xattrs(&h)
	g.created(l, p, kReg)
	g.emit(l, h, g.content())
}

func (g *stackGen) created(l *layerGen, p string, k kind) {
	if old, ok := l.upper[p]; ok && old == kDir {
		// The applier removes the directory with what this layer put in it.
		for q := range l.upper {
			if strings.HasPrefix(q, p+"/") {
				delete(l.upper, q)
				delete(l.explicit, q)
			}
		}
		delete(l.explicit, p)
	}
	l.upper[p] = k
	if k != kDir {
		l.linkable = append(l.linkable, p)
	}
	refreshLinkable(l)
}

// refreshLinkable drops replaced names from the hard link targets.
func refreshLinkable(l *layerGen) {
	kept := l.linkable[:0]
	for _, q := range l.linkable {
		if k2, ok := l.upper[q]; ok && k2 != kDir && k2 != kWhiteout {
			kept = append(kept, q)
		}
	}
	l.linkable = kept
}

func (g *stackGen) hardlink(l *layerGen, p, target string) {
	g.ensureParents(l, p)
	h := tar.Header{Typeflag: tar.TypeLink, Name: g.full(p), Linkname: g.full(target), ModTime: g.mtime()}
	// The link's own header: usually not what the target says.
	h.Mode = g.pick(fileModes)
	g.owner(&h)
	g.xattrs(&h)
	l.linked[target] = true
	l.linked[p] = true
	g.created(l, p, l.upper[target])
	g.emit(l, h, nil)
}

func (g *stackGen) symlink(l *layerGen, p string) {
	g.ensureParents(l, p)
	var target string
	// Symlinks point at what exists, at other symlinks (chains) or
	// nowhere, but never in a loop: containerd's applier fails on a
	// loop it has to resolve. A new name cannot close a loop; a
	// replaced symlink points at no symlink.
	_, replacing := g.merged[p]
	delete(g.symTarget, p)
	notLink := func(k kind) bool { return k != kSymlink || !replacing }
	switch w := g.r.Intn(6); w {
	case 0: // relative, to anything that exists
		if q, ok := g.pickLower(l, notLink); ok && q != p {
			target = relPath(parentOf(p), q)
			if g.merged[q] != kSymlink {
				g.symTarget[p] = q
			}
		}
	case 1: // absolute, inside the image
		if q, ok := g.pickLower(l, notLink); ok && q != p {
			target = "/" + g.full(q)
			if g.merged[q] != kSymlink {
				g.symTarget[p] = q
			}
		}
	case 2: // a chain: to another symlink
		if q, ok := g.pickLower(l, func(k kind) bool { return k == kSymlink }); ok && !replacing {
			target = relPath(parentOf(p), q)
		}
	case 3:
		target = "/nonexistent/" + g.name()
		g.symTarget[p] = "nonexistent"
	case 4:
		target = strings.Repeat("../long-target/", 10+g.r.Intn(30))
	}
	if target == "" {
		target = g.name()
	}
	h := tar.Header{Typeflag: tar.TypeSymlink, Name: g.full(p), Linkname: target, Mode: g.pick(linkModes), ModTime: g.mtime()}
	g.owner(&h)
	g.xattrs(&h)
	g.created(l, p, kSymlink)
	g.emit(l, h, nil)
}

// safeTarget reports whether symlink p points at a path none of whose
// parents was ever a non-directory.
func (g *stackGen) safeTarget(p string) bool {
	t, ok := g.symTarget[p]
	if !ok {
		return false
	}
	for a := parentOf(t); a != ""; a = parentOf(a) {
		if g.everNonDir[a] {
			return false
		}
	}
	return true
}

func relPath(from, to string) string {
	up := strings.Count(from, "/")
	if from != "" {
		up++
	}
	return strings.Repeat("../", up) + to
}

func (g *stackGen) special(l *layerGen, p string) {
	g.ensureParents(l, p)
	h := tar.Header{Name: g.full(p), Mode: g.pick(devModes), ModTime: g.mtime()}
	k := kFifo
	switch g.r.Intn(3) {
	case 0:
		h.Typeflag, k = tar.TypeChar, kChar
	case 1:
		h.Typeflag, k = tar.TypeBlock, kBlock
	default:
		h.Typeflag = tar.TypeFifo
	}
	if h.Typeflag != tar.TypeFifo {
		h.Devmajor, h.Devminor = g.r.Int63n(4096), g.r.Int63n(1<<20)
		if g.r.Intn(2) == 0 {
			h.Devmajor, h.Devminor = g.r.Int63n(16), g.r.Int63n(256)
		}
	}
	g.owner(&h)
	g.xattrs(&h)
	g.created(l, p, k)
	g.emit(l, h, nil)
}

// anyType puts an entry of a random type at p.
func (g *stackGen) anyType(l *layerGen, p string) {
	switch g.r.Intn(4) {
	case 0:
		g.dir(l, p)
	case 1:
		g.symlink(l, p)
	case 2:
		g.special(l, p)
	default:
		g.file(l, p)
	}
}

func (g *stackGen) whiteout(l *layerGen, p string) {
	g.ensureParents(l, p)
	h := tar.Header{Typeflag: tar.TypeReg, Name: g.full(path.Join(parentOf(p), ".wh."+path.Base(p))), Mode: 0o644, ModTime: g.mtime()}
	g.owner(&h)
	l.upper[p] = kWhiteout
	g.emit(l, h, nil)
}

// commit applies the layer to the model of the merged tree, as overlayfs
// presents it.
func (g *stackGen) commit(l *layerGen) {
	ps := make([]string, 0, len(l.upper))
	for p := range l.upper {
		ps = append(ps, p)
	}
	sort.Slice(ps, func(i, j int) bool {
		return depth(ps[i]) < depth(ps[j]) || depth(ps[i]) == depth(ps[j]) && ps[i] < ps[j]
	})
	drop := func(p string, keepUpper bool) {
		for q := range g.merged {
			if strings.HasPrefix(q, p+"/") || p == "" && q != "" {
				if _, up := l.upper[q]; !(keepUpper && up) {
					delete(g.merged, q)
					delete(g.dirAttrs, q)
				}
			}
		}
	}
	for _, p := range ps {
		if k := l.upper[p]; k != kDir && (k != kWhiteout || g.index > 0) {
			g.everNonDir[p] = true
		}
	}
	for _, p := range ps {
		k := l.upper[p]
		switch {
		case k == kWhiteout:
			delete(g.merged, p)
			delete(g.dirAttrs, p)
			drop(p, false)
		case k == kDir:
			if old, ok := g.merged[p]; ok && old != kDir {
				drop(p, true)
				delete(g.dirAttrs, p)
			}
			g.merged[p] = kDir
			if l.opaque[p] {
				drop(p, true)
			}
		default:
			drop(p, false)
			delete(g.dirAttrs, p)
			g.merged[p] = k
		}
	}
	for _, e := range l.entries {
		if e.hdr.Typeflag == tar.TypeDir {
			p := strings.TrimPrefix(strings.TrimSuffix(e.hdr.Name, "/"), g.prefix)
			p = strings.TrimPrefix(p, "/")
			if g.merged[p] == kDir {
				g.dirAttrs[p] = e.hdr
			}
		}
	}
}

func depth(p string) int {
	if p == "" {
		return 0
	}
	return 1 + strings.Count(p, "/")
}

// batchLayers merges the stacks of a batch into the layers of one image:
// layer i of the image holds layer i of every stack that has one.
func batchLayers(stacks [][][]layerEntry) [][]layerEntry {
	var out [][]layerEntry
	for _, s := range stacks {
		for i, l := range s {
			if i == len(out) {
				out = append(out, nil)
			}
			out[i] = append(out[i], l...)
		}
	}
	return out
}

func stackPrefix(i int) string { return fmt.Sprintf("s%03d", i) }
