package rootfs

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/containerd/containerd/content"
	"github.com/containerd/containerd/diff/apply"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
	"github.com/starlight-project/starlight/convert"
	"github.com/starlight-project/starlight/schema"
	"github.com/starlight-project/starlight/worker/layers"
	"github.com/starlight-project/starlight/worker/snapshotter"
	"github.com/starlight-project/starlight/worker/store"
)

// defaultSeed makes `make test` compare the same 200 random stacks every
// run, so that a landing is not decided by luck: -rootfs.seed=0 explores
// new ones. Seed 1796194071205509720 (stack 34) is a known difference
// still open: a directory re-declared without xattrs in a layer that lists
// a child of it before its own header shows none of its lower layer's
// xattrs in the FUSE view, where containerd keeps them.
const defaultSeed = 20261202

var (
	seedFlag   = flag.Int64("rootfs.seed", defaultSeed, "seed of the random layer stacks (0: a new one, logged)")
	stacksFlag = flag.Int("rootfs.stacks", 200, "random layer stacks to compare")
	batchFlag  = flag.Int("rootfs.batch", 25, "stacks per image (one set of mounts per image)")
	onlyFlag   = flag.Int("rootfs.only", -1, "compare only this stack (its index in the run)")
)

// chunkSize is the conversion's chunk size: small, so that generated files
// span several chunks.
const chunkSize = 4096

// TestRootfsMatchesContainerd is the property test of Starlight's root
// filesystems. Random layer stacks (see gen_test.go) are unpacked by
// containerd's overlayfs snapshotter and its applier, as containerd's
// unpacker does, and served by Starlight: each layer converted to eStargz,
// its tree stored in and read back from the registry's index, sent in a
// delta bundle, recorded by the worker's layer registry and mounted through
// Starlight's snapshotter. The container's rootfs must be the same file by
// file: type, mode, owner, size, content, symlink target, device number,
// xattrs, link count, mtime (but of directories) and which names are hard
// links of each other. It is compared while the contents are still
// arriving (metadata before any content, then contents as they stream in,
// in random order) and again once every layer is complete.
//
// Several stacks share one image, each under its own root directory, so
// that a run mounts a few images instead of hundreds. A failure names the
// stack; -rootfs.seed and -rootfs.only replay it.
func TestRootfsMatchesContainerd(t *testing.T) {
	requirePrivileges(t)
	// containerd's applier logs every xattr it drops.
	log.SetLevel("error")
	seed := *seedFlag
	if seed == 0 { // explore: a new seed
		seed = time.Now().UnixNano()
	}
	t.Logf("seed %d: replay with go test ./integration/rootfs -run TestRootfsMatchesContainerd -rootfs.seed=%d", seed, seed)
	opts := genOptions{nonUTF8: true}
	var total coverage
	stacks := *stacksFlag
	for first := 0; first < stacks; first += *batchFlag {
		var idx []int
		for i := first; i < min(first+*batchFlag, stacks); i++ {
			if *onlyFlag < 0 || *onlyFlag == i {
				idx = append(idx, i)
			}
		}
		if len(idx) == 0 {
			continue
		}
		gen := make([][][]layerEntry, len(idx))
		for j, i := range idx {
			gen[j] = newStackGen(seed+int64(i), stackPrefix(i), opts).layers()
			total.add(gen[j])
		}
		t.Run(fmt.Sprintf("stacks-%03d-%03d", idx[0], idx[len(idx)-1]), func(t *testing.T) {
			compareBatch(t, rand.New(rand.NewSource(seed+int64(first))), batchLayers(gen))
		})
		if t.Failed() {
			t.Logf("replay one stack with -rootfs.seed=%d -rootfs.only=N", seed)
			return
		}
	}
	t.Logf("compared %s", total)
}

// coverage counts what the generated stacks hold, so that a run shows the
// cases it compared.
type coverage struct {
	stacks, layers, entries, hardlinks, dirsAgain, opaque, whiteouts, symlinks, devices, fifos,
	xattrs, special, long, nonUTF8 int
}

func (c *coverage) add(stack [][]layerEntry) {
	c.stacks++
	dirs := map[string]bool{}
	for _, l := range stack {
		c.layers++
		for _, e := range l {
			c.entries++
			h := e.hdr
			base := path.Base(h.Name)
			switch {
			case base == ".wh..wh..opq":
				c.opaque++
			case strings.HasPrefix(base, ".wh."):
				c.whiteouts++
			case h.Typeflag == tar.TypeLink:
				c.hardlinks++
			case h.Typeflag == tar.TypeSymlink:
				c.symlinks++
			case h.Typeflag == tar.TypeChar || h.Typeflag == tar.TypeBlock:
				c.devices++
			case h.Typeflag == tar.TypeFifo:
				c.fifos++
			case h.Typeflag == tar.TypeDir:
				if dirs[h.Name] {
					c.dirsAgain++
				}
				dirs[h.Name] = true
			}
			if len(h.PAXRecords) > 0 {
				c.xattrs++
			}
			if h.Mode&0o7000 != 0 {
				c.special++
			}
			if len(base) > 100 {
				c.long++
			}
			if !utf8.ValidString(h.Name) {
				c.nonUTF8++
			}
		}
	}
}

func (c coverage) String() string {
	return fmt.Sprintf("%d stacks, %d layers, %d entries: %d hard links, %d directories declared again, %d opaque markers, "+
		"%d whiteouts, %d symlinks, %d devices, %d fifos, %d with xattrs, %d setuid/setgid/sticky, %d long names, %d non-UTF-8 names",
		c.stacks, c.layers, c.entries, c.hardlinks, c.dirsAgain, c.opaque, c.whiteouts, c.symlinks, c.devices, c.fifos,
		c.xattrs, c.special, c.long, c.nonUTF8)
}

func requirePrivileges(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: the rootfs property test mounts FUSE and overlayfs and needs root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("SKIPPED: the rootfs property test needs /dev/fuse: %v", err)
	}
}

// image is one generated image: its layer blobs as pushed (gzip tar).
type image struct {
	blobs [][]byte
	descs []ocispec.Descriptor
}

func buildImage(t *testing.T, layers [][]layerEntry) *image {
	t.Helper()
	img := &image{}
	for i, l := range layers {
		var raw bytes.Buffer
		tw := tar.NewWriter(&raw)
		for _, e := range l {
			h := e.hdr
			if err := tw.WriteHeader(&h); err != nil {
				t.Fatalf("layer %d: writing %q: %v", i, h.Name, err)
			}
			if _, err := tw.Write(e.data); err != nil {
				t.Fatalf("layer %d: writing %q: %v", i, h.Name, err)
			}
		}
		if err := tw.Close(); err != nil {
			t.Fatal(err)
		}
		var gz bytes.Buffer
		zw := gzip.NewWriter(&gz)
		zw.Write(raw.Bytes())
		zw.Close()
		img.blobs = append(img.blobs, gz.Bytes())
		img.descs = append(img.descs, ocispec.Descriptor{
			MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(gz.Bytes()), Size: int64(gz.Len()),
		})
	}
	return img
}

func compareBatch(t *testing.T, r *rand.Rand, layers [][]layerEntry) {
	ctx := context.Background()
	img := buildImage(t, layers)
	dir := shortTempDir(t)

	want := containerdRootfs(t, ctx, img, filepath.Join(dir, "ctd"))
	wantTree := scan(t, want, true)

	sl := newStarlight(t, ctx, img, filepath.Join(dir, "sl"), r)
	arriving := sl.rootfs(t, ctx, "arriving")
	if got := scan(t, arriving, false); !diffTrees(t, "arriving, no content yet", stripContent(wantTree), got) {
		sl.release()
		return
	}
	sl.release()
	got := scanWithin(t, arriving, 5*time.Minute)
	if !diffTrees(t, "arriving", wantTree, got) {
		return
	}
	// Layers complete one by one: a rootfs mixes FUSE views and
	// materialised layers until all are complete.
	sl.receive(t)
	for i := range sl.trees {
		if i%2 == 0 {
			sl.complete(t, i)
		}
	}
	if !diffTrees(t, "some layers materialised", wantTree, scan(t, sl.rootfs(t, ctx, "mixed"), true)) {
		return
	}
	for i := range sl.trees {
		if i%2 == 1 {
			sl.complete(t, i)
		}
	}
	complete := sl.rootfs(t, ctx, "complete")
	// No FUSE view on the path of the new container.
	if !strings.Contains(sl.options["complete"], "metacopy=on") || strings.Contains(sl.options["complete"], "/mnt") {
		t.Errorf("the rootfs of complete layers is %s, want materialised layers over the store", sl.options["complete"])
	}
	diffTrees(t, "complete, materialised", wantTree, scan(t, complete, true))
}

// shortTempDir keeps overlay option strings short.
func shortTempDir(t *testing.T) string {
	d, err := os.MkdirTemp("", "slrfs-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// mountRootfs mounts a snapshot's mounts at a new directory and unmounts it
// when the test ends.
func mountRootfs(t *testing.T, mounts []mount.Mount, target string) string {
	t.Helper()
	if err := os.MkdirAll(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := mount.All(mounts, target); err != nil {
		t.Fatalf("mounting %v: %v", mounts, err)
	}
	t.Cleanup(func() {
		if err := mount.UnmountAll(target, 0); err != nil {
			t.Errorf("unmounting %s: %v", target, err)
			unix.Unmount(target, unix.MNT_DETACH)
		}
	})
	return target
}

// memProvider serves the image's blobs to containerd's applier.
type memProvider map[digest.Digest][]byte

func (m memProvider) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (content.ReaderAt, error) {
	b, ok := m[desc.Digest]
	if !ok {
		return nil, fmt.Errorf("blob %s: %w", desc.Digest, errdefs.ErrNotFound)
	}
	return readerAt{bytes.NewReader(b)}, nil
}

type readerAt struct{ *bytes.Reader }

func (readerAt) Close() error { return nil }

// containerdRootfs unpacks the image with containerd's overlayfs
// snapshotter and applier, as containerd's unpacker does, and mounts a
// container's rootfs on it.
func containerdRootfs(t *testing.T, ctx context.Context, img *image, root string) string {
	t.Helper()
	sn, err := overlay.NewSnapshotter(filepath.Join(root, "snapshotter"))
	if err != nil {
		t.Fatalf("containerd's overlayfs snapshotter: %v", err)
	}
	t.Cleanup(func() { sn.Close() })
	provider := memProvider{}
	for i, d := range img.descs {
		provider[d.Digest] = img.blobs[i]
	}
	applier := apply.NewFileSystemApplier(provider)
	parent := ""
	for i, desc := range img.descs {
		key, name := fmt.Sprintf("extract-%d", i), fmt.Sprintf("layer-%d", i)
		mounts, err := sn.Prepare(ctx, key, parent)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := applier.Apply(ctx, desc, mounts); err != nil {
			t.Fatalf("containerd cannot apply layer %d (the generator made an invalid layer): %v", i, err)
		}
		if err := sn.Commit(ctx, name, key); err != nil {
			t.Fatal(err)
		}
		parent = name
	}
	mounts, err := sn.Prepare(ctx, "container", parent)
	if err != nil {
		t.Fatal(err)
	}
	return mountRootfs(t, mounts, filepath.Join(root, "rootfs"))
}

// starlight is the Starlight side of a batch: the converted layers, the
// worker's store, layer registry and snapshotter, and the bundle stream
// that brings the contents.
type starlight struct {
	root     string
	reg      *layers.Registry
	sn       snapshots.Snapshotter
	trees    []api.LayerTree
	top      string
	gate     chan struct{}
	received chan error
	options  map[string]string // mount options of each rootfs
}

func newStarlight(t *testing.T, ctx context.Context, img *image, root string, r *rand.Rand) *starlight {
	t.Helper()
	db, err := schema.Open(ctx, filepath.Join(root, "index.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })

	// The registry's side: conversion and indexing, then the trees as the
	// delta planner reads them back.
	blobs := map[string][]byte{}
	var trees []api.LayerTree
	for i, b := range img.blobs {
		l, err := convert.ConvertLayer(ctx, bytes.NewReader(b), convert.Options{ChunkSize: chunkSize, TempDir: root})
		if err != nil {
			t.Fatalf("converting layer %d: %v", i, err)
		}
		blob, err := io.ReadAll(l.File)
		l.Close()
		if err != nil {
			t.Fatal(err)
		}
		d := l.Desc.Digest.String()
		blobs[d] = blob
		if err := db.PutLayer(ctx, &schema.Layer{Digest: d, DiffID: l.DiffID.String(), Size: l.Desc.Size,
			TOCDigest: l.Index.TOCDigest.String(), UncompressedSize: l.Index.UncompressedSize, Entries: l.Index.Entries}); err != nil {
			t.Fatalf("indexing layer %d: %v", i, err)
		}
		stored, err := db.GetLayer(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		trees = append(trees, api.LayerTree{Digest: d, DiffID: stored.DiffID, Size: stored.Size, Entries: stored.Entries})
	}

	// The bundle: every content once, its chunks in random order.
	h := &api.BundleHeader{Repository: "rootfs/test", ManifestDigest: digest.FromString("manifest").String(), Layers: trees}
	var raws [][]byte
	seen := map[string]bool{}
	for _, tr := range trees {
		for _, e := range tr.Entries {
			if e.Type != api.TypeReg || e.Size == 0 || seen[e.Digest] {
				continue
			}
			seen[e.Digest] = true
			for _, c := range e.Chunks {
				h.Frames = append(h.Frames, api.Frame{Digest: e.Digest, Offset: c.Offset, Size: c.Size, ChunkDigest: c.Digest, CompressedSize: c.CompressedSize})
				raws = append(raws, blobs[tr.Digest][c.CompressedOffset:c.CompressedOffset+c.CompressedSize])
			}
		}
	}
	r.Shuffle(len(raws), func(i, j int) {
		h.Frames[i], h.Frames[j] = h.Frames[j], h.Frames[i]
		raws[i], raws[j] = raws[j], raws[i]
	})
	pr, pw := io.Pipe()
	s := &starlight{root: root, gate: make(chan struct{}), received: make(chan error, 1), options: map[string]string{}}
	go func() {
		bw, err := bundle.NewWriter(pw, h)
		if err == nil {
			<-s.gate // contents arrive once the metadata is compared
			for _, raw := range raws {
				if err = bw.WriteFrame(bytes.NewReader(raw)); err != nil {
					break
				}
			}
		}
		pw.CloseWithError(err)
	}()
	t.Cleanup(func() {
		s.release()
		pr.Close()
	})

	// The worker's side, in the puller's order: trees recorded, contents
	// expected, snapshots committed, then the stream.
	br, err := bundle.NewReader(pr)
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(filepath.Join(root, "store"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if err := snapshotter.DataLayersSupported(root, nil); err != nil {
		t.Fatalf("overlayfs cannot stack materialised layers here: %v", err)
	}
	s.reg, err = layers.Open(ctx, filepath.Join(root, "layers"), st, layers.FUSEMounter(st, nil, nil), layers.Materialize(st))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.reg.Close(); err != nil {
			t.Errorf("unmounting layer views: %v", err)
		}
	})
	s.trees = br.Header().Layers
	for i := range s.trees {
		if err := s.reg.Add(&s.trees[i]); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.ExpectHeader(br.Header()); err != nil {
		t.Fatal(err)
	}
	s.sn, err = snapshotter.New(filepath.Join(root, "snapshotter"), s.reg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.sn.Close() })
	parent := ""
	for i, tr := range s.trees {
		name := fmt.Sprintf("layer-%d", i)
		_, err := s.sn.Prepare(ctx, fmt.Sprintf("extract-%d", i), parent, snapshots.WithLabels(map[string]string{
			snapshotter.LabelSnapshotRef: name, snapshotter.LabelLayerDigest: tr.Digest,
		}))
		if !errdefs.IsAlreadyExists(err) {
			t.Fatalf("remote layer %d: Prepare: %v, want an already-exists error", i, err)
		}
		parent = name
	}
	s.top = parent
	go func() { s.received <- st.Receive(ctx, br, nil) }()
	return s
}

// release lets the contents stream in.
func (s *starlight) release() {
	select {
	case <-s.gate:
	default:
		close(s.gate)
	}
}

// rootfs prepares and mounts a new container's rootfs.
func (s *starlight) rootfs(t *testing.T, ctx context.Context, key string) string {
	t.Helper()
	mounts, err := s.sn.Prepare(ctx, key, s.top)
	if err != nil {
		t.Fatal(err)
	}
	s.options[key] = strings.Join(mounts[0].Options, ",")
	return mountRootfs(t, mounts, filepath.Join(s.root, "rootfs-"+key))
}

// receive waits for the stream to end.
func (s *starlight) receive(t *testing.T) {
	t.Helper()
	if err := <-s.received; err != nil {
		t.Fatalf("receiving the bundle: %v", err)
	}
}

// complete marks layer i complete, as the puller does once its contents
// are in; it is then materialised.
func (s *starlight) complete(t *testing.T, i int) {
	t.Helper()
	ok, err := s.reg.CheckComplete(&s.trees[i])
	if err != nil || !ok {
		t.Fatalf("layer %d complete: %v, %v", i, ok, err)
	}
	if d := digest.Digest(s.trees[i].Digest); !s.reg.Materialized(d) {
		t.Fatalf("layer %d is complete but not materialised", i)
	}
}

// fileInfo is what the comparison records of one path.
type fileInfo struct {
	Type   string
	Mode   uint32 // permissions with setuid, setgid, sticky
	UID    uint32
	GID    uint32
	Size   int64  // regular files and symlinks
	SHA256 string // regular files, when contents are read
	Link   string // symlink target
	Rdev   string // devices: major:minor
	Xattrs string // sorted name=hex value, overlayfs' own left out
	Nlink  uint64 // non-directories
	Mtime  int64  // non-directories (a directory's changes as the applier fills it)
	// HardLink is the first path (in walk order) of the inode, for every
	// name of an inode with several names.
	HardLink string
}

func typeOf(m uint32) string {
	switch m & unix.S_IFMT {
	case unix.S_IFREG:
		return "reg"
	case unix.S_IFDIR:
		return "dir"
	case unix.S_IFLNK:
		return "symlink"
	case unix.S_IFCHR:
		return "char"
	case unix.S_IFBLK:
		return "block"
	case unix.S_IFIFO:
		return "fifo"
	case unix.S_IFSOCK:
		return "socket"
	}
	return fmt.Sprintf("type-%o", m&unix.S_IFMT)
}

// scan walks root, without following symlinks; withContent reads every
// regular file.
func scan(t *testing.T, root string, withContent bool) map[string]*fileInfo {
	t.Helper()
	m, err := scanTree(root, withContent)
	if err != nil {
		t.Fatalf("scanning %s: %v", root, err)
	}
	return m
}

func scanTree(root string, withContent bool) (map[string]*fileInfo, error) {
	out := map[string]*fileInfo{}
	type ino struct{ dev, ino uint64 }
	first := map[ino]string{}
	var walk func(rel string) error
	walk = func(rel string) error {
		p := filepath.Join(root, rel)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); errors.Is(err, unix.ENOENT) && rel != "." {
			// overlayfs lists a whiteout of the top layer of a
			// directory that is not merged (an opaque one, say) and
			// then does not find it; a rootfs must do the same.
			out[rel] = &fileInfo{Type: "listed, not found"}
			return nil
		} else if err != nil {
			return fmt.Errorf("%q: %w", rel, err)
		}
		fi := &fileInfo{Type: typeOf(st.Mode), Mode: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid}
		if fi.Type != "dir" {
			fi.Nlink, fi.Mtime = uint64(st.Nlink), st.Mtim.Sec
			k := ino{st.Dev, st.Ino}
			if f, ok := first[k]; ok {
				fi.HardLink = f
			} else {
				first[k] = rel
			}
		}
		switch fi.Type {
		case "reg":
			fi.Size = st.Size
			if withContent {
				sum, err := fileSHA256(p)
				if err != nil {
					return err
				}
				fi.SHA256 = sum
			}
		case "symlink":
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fi.Link, fi.Size = target, st.Size
		case "char", "block":
			fi.Rdev = fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		}
		x, err := xattrs(p)
		if err != nil {
			return fmt.Errorf("%q: %w", rel, err)
		}
		fi.Xattrs = x
		out[rel] = fi
		if fi.Type == "dir" {
			ents, err := os.ReadDir(p)
			if err != nil {
				return err
			}
			for _, e := range ents {
				if err := walk(filepath.Join(rel, e.Name())); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := walk("."); err != nil {
		return nil, err
	}
	// An inode's first name only knows it is shared once a second one is
	// found.
	for _, fi := range out {
		if fi.HardLink != "" {
			out[fi.HardLink].HardLink = fi.HardLink
		}
	}
	return out, nil
}

// scanWithin scans with contents, failing if the contents do not arrive:
// a read that waits for a chunk the stream never brings would hang.
func scanWithin(t *testing.T, root string, limit time.Duration) map[string]*fileInfo {
	t.Helper()
	type result struct {
		m   map[string]*fileInfo
		err error
	}
	done := make(chan result, 1)
	go func() {
		m, err := scanTree(root, true)
		done <- result{m, err}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatalf("scanning %s: %v", root, r.err)
		}
		return r.m
	case <-time.After(limit):
		t.Fatalf("reading the contents of %s while they arrive did not finish in %v: a read waits for a chunk the stream does not bring", root, limit)
		return nil
	}
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

func xattrs(p string) (string, error) {
	sz, err := unix.Llistxattr(p, nil)
	if err != nil || sz == 0 {
		return "", ignoreNoXattr(err)
	}
	buf := make([]byte, sz)
	sz, err = unix.Llistxattr(p, buf)
	if err != nil {
		return "", err
	}
	var kv []string
	for _, k := range strings.Split(strings.TrimRight(string(buf[:sz]), "\x00"), "\x00") {
		if k == "" || strings.HasPrefix(k, "trusted.overlay.") {
			continue
		}
		v := make([]byte, 64<<10)
		n, err := unix.Lgetxattr(p, k, v)
		if err != nil {
			return "", fmt.Errorf("getxattr %s: %w", k, err)
		}
		kv = append(kv, k+"="+hex.EncodeToString(v[:n]))
	}
	sort.Strings(kv)
	return strings.Join(kv, ","), nil
}

func ignoreNoXattr(err error) error {
	if errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.ENODATA) {
		return nil
	}
	return err
}

func stripContent(m map[string]*fileInfo) map[string]*fileInfo {
	out := make(map[string]*fileInfo, len(m))
	for k, v := range m {
		c := *v
		c.SHA256 = ""
		out[k] = &c
	}
	return out
}

// diffTrees reports every difference (A = containerd, B = Starlight) and
// whether there was none.
func diffTrees(t *testing.T, state string, a, b map[string]*fileInfo) bool {
	t.Helper()
	var lines []string
	for p, fa := range a {
		fb, ok := b[p]
		if !ok {
			lines = append(lines, fmt.Sprintf("%q: only in containerd's rootfs (%s)", p, fa.Type))
			continue
		}
		if d := fieldDiff(*fa, *fb); d != "" {
			lines = append(lines, fmt.Sprintf("%q: %s", p, d))
		}
	}
	for p, fb := range b {
		if _, ok := a[p]; !ok {
			lines = append(lines, fmt.Sprintf("%q: only in Starlight's rootfs (%s)", p, fb.Type))
		}
	}
	if len(lines) == 0 {
		return true
	}
	sort.Strings(lines)
	if len(lines) > 60 {
		lines = append(lines[:60], fmt.Sprintf("... and %d more", len(lines)-60))
	}
	t.Errorf("%s: the Starlight rootfs differs from containerd's (A = containerd, B = Starlight):\n%s", state, strings.Join(lines, "\n"))
	return false
}

func fieldDiff(a, b fileInfo) string {
	var out []string
	add := func(name string, x, y any) {
		if x != y {
			out = append(out, fmt.Sprintf("%s A=%v B=%v", name, x, y))
		}
	}
	add("type", a.Type, b.Type)
	add("mode", fmt.Sprintf("%04o", a.Mode), fmt.Sprintf("%04o", b.Mode))
	add("uid", a.UID, b.UID)
	add("gid", a.GID, b.GID)
	add("size", a.Size, b.Size)
	add("sha256", a.SHA256, b.SHA256)
	add("link", a.Link, b.Link)
	add("rdev", a.Rdev, b.Rdev)
	add("xattrs", a.Xattrs, b.Xattrs)
	add("nlink", a.Nlink, b.Nlink)
	add("mtime", a.Mtime, b.Mtime)
	add("hardlink", a.HardLink, b.HardLink)
	return strings.Join(out, "; ")
}
