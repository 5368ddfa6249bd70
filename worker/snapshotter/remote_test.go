//go:build linux

package snapshotter

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// fakeLayers serves plain directories as remote layers.
type fakeLayers struct {
	mu       sync.Mutex
	dirs     map[digest.Digest]string
	sizes    map[digest.Digest]int64
	released []digest.Digest
}

func (f *fakeLayers) Resolve(_ context.Context, labels map[string]string) (digest.Digest, bool) {
	v := labels[LabelLayerDigest]
	if v == "" {
		v = labels[LabelInheritedLayerDigest]
	}
	d, err := digest.Parse(v)
	if err != nil {
		return "", false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.dirs[d]
	return d, ok
}

func (f *fakeLayers) Dir(_ context.Context, d digest.Digest) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	dir, ok := f.dirs[d]
	if !ok {
		return "", errdefs.ErrNotFound
	}
	return dir, nil
}

func (f *fakeLayers) Release(_ context.Context, d digest.Digest) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.released = append(f.released, d)
}

func (f *fakeLayers) Usage(_ context.Context, d digest.Digest) (snapshots.Usage, error) {
	return snapshots.Usage{Size: f.sizes[d]}, nil
}

func (f *fakeLayers) releasedLayers() []digest.Digest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.released)
}

// layerSpec builds one layer's tree in a directory.
type layerSpec func(t *testing.T, dir string)

func file(name, content string) layerSpec {
	return func(t *testing.T, dir string) {
		p := filepath.Join(dir, name)
		must(t, os.MkdirAll(filepath.Dir(p), 0o755))
		must(t, os.WriteFile(p, []byte(content), 0o644))
	}
}

// whiteout is overlayfs' (and the OCI-on-overlay) deletion marker: a 0:0
// character device.
func whiteout(name string) layerSpec {
	return func(t *testing.T, dir string) {
		must(t, unix.Mknod(filepath.Join(dir, name), unix.S_IFCHR, 0))
	}
}

func opaqueDir(name string) layerSpec {
	return func(t *testing.T, dir string) {
		p := filepath.Join(dir, name)
		must(t, os.MkdirAll(p, 0o755))
		must(t, unix.Setxattr(p, "trusted.overlay.opaque", []byte("y"), 0))
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

type remoteEnv struct {
	ctx    context.Context
	sn     snapshots.Snapshotter
	layers *fakeLayers
	root   string
}

func newRemoteEnv(t *testing.T) *remoteEnv {
	t.Helper()
	requireRoot(t)
	root := t.TempDir()
	layers := &fakeLayers{dirs: map[digest.Digest]string{}, sizes: map[digest.Digest]int64{}}
	sn, err := New(filepath.Join(root, "snapshotter"), layers)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sn.Close() })
	return &remoteEnv{
		ctx:    namespaces.WithNamespace(context.Background(), "test"),
		sn:     sn,
		layers: layers,
		root:   root,
	}
}

// addLayer creates a remote layer from specs and returns its digest.
func (e *remoteEnv) addLayer(t *testing.T, name string, specs ...layerSpec) digest.Digest {
	t.Helper()
	dir := filepath.Join(e.root, "layers", name)
	must(t, os.MkdirAll(dir, 0o755))
	for _, s := range specs {
		s(t, dir)
	}
	d := digest.FromString(name)
	e.layers.mu.Lock()
	e.layers.dirs[d] = dir
	e.layers.sizes[d] = int64(len(name))
	e.layers.mu.Unlock()
	return d
}

// prepareRemote runs the remote-snapshotter protocol for one layer and
// asserts its outcome.
func (e *remoteEnv) prepareRemote(t *testing.T, target, parent string, d digest.Digest) {
	t.Helper()
	_, err := e.sn.Prepare(e.ctx, "extract-"+target, parent, snapshots.WithLabels(map[string]string{
		LabelSnapshotRef: target,
		LabelLayerDigest: d.String(),
	}))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of remote layer %s: got %v, want an already-exists error", target, err)
	}
}

// mountAt mounts ms on a fresh directory, unmounted at the end of the test.
func (e *remoteEnv) mountAt(t *testing.T, ms []mount.Mount) string {
	t.Helper()
	target, err := os.MkdirTemp(e.root, "mnt-")
	must(t, err)
	if err := mount.All(ms, target); err != nil {
		t.Fatalf("mount %+v: %v", ms, err)
	}
	t.Cleanup(func() {
		if err := mount.UnmountAll(target, 0); err != nil {
			t.Errorf("unmount %s: %v", target, err)
		}
	})
	return target
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func optionValue(m mount.Mount, key string) string {
	for _, o := range m.Options {
		if v, ok := strings.CutPrefix(o, key+"="); ok {
			return v
		}
	}
	return ""
}

func TestPrepareRemoteCommitsTarget(t *testing.T) {
	e := newRemoteEnv(t)
	d1 := e.addLayer(t, "l1", file("a", "1"))
	d2 := e.addLayer(t, "l2", file("b", "2"))

	e.prepareRemote(t, "chain1", "", d1)
	e.prepareRemote(t, "chain2", "chain1", d2)

	for _, tc := range []struct {
		name, parent string
		layer        digest.Digest
		size         int64
	}{
		{"chain1", "", d1, 2},
		{"chain2", "chain1", d2, 2},
	} {
		info, err := e.sn.Stat(e.ctx, tc.name)
		if err != nil {
			t.Fatalf("Stat(%s): %v", tc.name, err)
		}
		if info.Kind != snapshots.KindCommitted || info.Parent != tc.parent {
			t.Errorf("Stat(%s) = kind %v parent %q, want committed on %q", tc.name, info.Kind, info.Parent, tc.parent)
		}
		if info.Labels[LabelLayerDigest] != tc.layer.String() || info.Labels[LabelSnapshotRef] != tc.name {
			t.Errorf("Stat(%s) labels = %v, want layer %s and ref %s", tc.name, info.Labels, tc.layer, tc.name)
		}
		usage, err := e.sn.Usage(e.ctx, tc.name)
		if err != nil || usage.Size != tc.size {
			t.Errorf("Usage(%s) = %+v, %v; want size %d from Layers", tc.name, usage, err, tc.size)
		}
	}
	// The temporary active snapshots are gone.
	for _, key := range []string{"extract-chain1", "extract-chain2"} {
		if _, err := e.sn.Stat(e.ctx, key); !errdefs.IsNotFound(err) {
			t.Errorf("Stat(%s) = %v, want not found", key, err)
		}
	}

	// Preparing an existing target again says so and creates nothing.
	_, err := e.sn.Prepare(e.ctx, "extract-again", "", snapshots.WithLabels(map[string]string{
		LabelSnapshotRef: "chain1", LabelLayerDigest: d1.String(),
	}))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("second Prepare of chain1: %v, want already exists", err)
	}
	var names []string
	must(t, e.sn.Walk(e.ctx, func(_ context.Context, i snapshots.Info) error {
		names = append(names, i.Name)
		return nil
	}))
	slices.Sort(names)
	if !slices.Equal(names, []string{"chain1", "chain2"}) {
		t.Errorf("snapshots = %v, want [chain1 chain2]", names)
	}

	// containerd's metadata layer finds the target with this filter.
	var found []string
	must(t, e.sn.Walk(e.ctx, func(_ context.Context, i snapshots.Info) error {
		found = append(found, i.Name)
		return nil
	}, `labels."containerd.io/snapshot.ref"==chain2,parent=="chain1"`))
	if !slices.Equal(found, []string{"chain2"}) {
		t.Errorf("Walk by ref and parent = %v, want [chain2]", found)
	}
}

func TestPrepareUnresolvedIsOrdinary(t *testing.T) {
	e := newRemoteEnv(t)
	unknown := digest.FromString("not served here")
	ms, err := e.sn.Prepare(e.ctx, "extract-x", "", snapshots.WithLabels(map[string]string{
		LabelSnapshotRef: "x", LabelLayerDigest: unknown.String(),
	}))
	if err != nil {
		t.Fatalf("Prepare of an unresolvable layer: %v, want an ordinary active snapshot", err)
	}
	if len(ms) != 1 || ms[0].Type != "bind" {
		t.Fatalf("mounts = %+v, want one bind mount of the upper dir", ms)
	}
	info, err := e.sn.Stat(e.ctx, "extract-x")
	must(t, err)
	if info.Kind != snapshots.KindActive {
		t.Errorf("kind = %v, want active", info.Kind)
	}
	if _, ok := info.Labels[LabelLayerDigest]; ok {
		t.Errorf("ordinary snapshot kept %s: %v", LabelLayerDigest, info.Labels)
	}
	if _, err := e.sn.Stat(e.ctx, "x"); !errdefs.IsNotFound(err) {
		t.Errorf("Stat(x) = %v, want not found", err)
	}
}

// buildChain creates the 3-layer remote chain used by the overlay tests.
func buildChain(t *testing.T, e *remoteEnv) (d1, d2, d3 digest.Digest) {
	d1 = e.addLayer(t, "l1",
		file("a", "layer1"),
		file("b", "layer1"),
		file("keep", "layer1"),
		file("opq/old", "layer1"),
	)
	d2 = e.addLayer(t, "l2",
		whiteout("b"),
		opaqueDir("opq"),
		file("opq/new", "layer2"),
	)
	d3 = e.addLayer(t, "l3", file("a", "layer3"))
	e.prepareRemote(t, "c1", "", d1)
	e.prepareRemote(t, "c2", "c1", d2)
	e.prepareRemote(t, "c3", "c2", d3)
	return d1, d2, d3
}

// checkMerged asserts the overlay semantics of the 3-layer chain.
func checkMerged(t *testing.T, root string) {
	t.Helper()
	if got := readFile(t, filepath.Join(root, "a")); got != "layer3" {
		t.Errorf("/a = %q, want layer 3's content", got)
	}
	if got := readFile(t, filepath.Join(root, "keep")); got != "layer1" {
		t.Errorf("/keep = %q, want layer 1's content", got)
	}
	if _, err := os.Lstat(filepath.Join(root, "b")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("/b whited out in layer 2: Lstat = %v, want not exist", err)
	}
	entries, err := os.ReadDir(filepath.Join(root, "opq"))
	must(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if !slices.Equal(names, []string{"new"}) {
		t.Errorf("/opq (opaque in layer 2) = %v, want [new]", names)
	}
}

func TestContainerOnRemoteChain(t *testing.T) {
	e := newRemoteEnv(t)
	d1, d2, d3 := buildChain(t, e)

	ms, err := e.sn.Prepare(e.ctx, "container", "c3")
	must(t, err)
	if len(ms) != 1 || ms[0].Type != "overlay" {
		t.Fatalf("mounts = %+v, want one overlay", ms)
	}
	wantLower := strings.Join([]string{e.layers.dirs[d3], e.layers.dirs[d2], e.layers.dirs[d1]}, ":")
	if got := optionValue(ms[0], "lowerdir"); got != wantLower {
		t.Errorf("lowerdir = %q, want nearest parent first %q", got, wantLower)
	}
	if !slices.Contains(ms[0].Options, "index=off") && supportsIndex() {
		t.Errorf("options %v lack index=off", ms[0].Options)
	}
	upper := optionValue(ms[0], "upperdir")
	if upper == "" || optionValue(ms[0], "workdir") == "" {
		t.Fatalf("options %v lack upperdir/workdir", ms[0].Options)
	}

	// Mounts gives the same answer later.
	again, err := e.sn.Mounts(e.ctx, "container")
	must(t, err)
	if !slices.Equal(again[0].Options, ms[0].Options) {
		t.Errorf("Mounts = %v, Prepare gave %v", again[0].Options, ms[0].Options)
	}

	rootfs := e.mountAt(t, ms)
	checkMerged(t, rootfs)

	// Writes land in the container's upper dir; the layers stay untouched.
	must(t, os.WriteFile(filepath.Join(rootfs, "a"), []byte("container"), 0o644))
	must(t, os.WriteFile(filepath.Join(rootfs, "new"), []byte("container"), 0o644))
	must(t, os.Remove(filepath.Join(rootfs, "keep")))
	if got := readFile(t, filepath.Join(upper, "a")); got != "container" {
		t.Errorf("upper /a = %q, want the container's write", got)
	}
	if got := readFile(t, filepath.Join(upper, "new")); got != "container" {
		t.Errorf("upper /new = %q, want the container's write", got)
	}
	if got := readFile(t, filepath.Join(e.layers.dirs[d3], "a")); got != "layer3" {
		t.Errorf("layer 3 /a = %q after a container write, want it unchanged", got)
	}
	if got := readFile(t, filepath.Join(e.layers.dirs[d1], "keep")); got != "layer1" {
		t.Errorf("layer 1 /keep = %q after a container delete, want it unchanged", got)
	}
	if usage, err := e.sn.Usage(e.ctx, "container"); err != nil || usage.Size == 0 {
		t.Errorf("Usage(container) = %+v, %v; want the upper dir's writes", usage, err)
	}
}

func TestViewsOfRemoteChain(t *testing.T) {
	e := newRemoteEnv(t)
	d1, _, _ := buildChain(t, e)

	// Several lowers: a read-only overlay.
	ms, err := e.sn.View(e.ctx, "view3", "c3")
	must(t, err)
	if len(ms) != 1 || ms[0].Type != "overlay" || optionValue(ms[0], "upperdir") != "" {
		t.Fatalf("view of c3 mounts = %+v, want an overlay without upper dir", ms)
	}
	v3 := e.mountAt(t, ms)
	checkMerged(t, v3)
	if err := os.WriteFile(filepath.Join(v3, "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write to a view = %v, want EROFS", err)
	}

	// One lower: a read-only bind of the layer's directory.
	ms, err = e.sn.View(e.ctx, "view1", "c1")
	must(t, err)
	if len(ms) != 1 || ms[0].Type != "bind" || ms[0].Source != e.layers.dirs[d1] || !slices.Contains(ms[0].Options, "ro") {
		t.Fatalf("view of c1 mounts = %+v, want a read-only bind of %s", ms, e.layers.dirs[d1])
	}
	v1 := e.mountAt(t, ms)
	if got := readFile(t, filepath.Join(v1, "b")); got != "layer1" {
		t.Errorf("view of c1: /b = %q, want layer 1's content", got)
	}
	if err := os.WriteFile(filepath.Join(v1, "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write to a view = %v, want EROFS", err)
	}
}

// TestMixedChain puts an ordinary (unpacked) layer on a remote one.
func TestMixedChain(t *testing.T) {
	e := newRemoteEnv(t)
	d1 := e.addLayer(t, "l1", file("a", "layer1"), file("b", "layer1"))
	e.prepareRemote(t, "c1", "", d1)

	ms, err := e.sn.Prepare(e.ctx, "unpack", "c1")
	must(t, err)
	dir := e.mountAt(t, ms)
	must(t, os.WriteFile(filepath.Join(dir, "b"), []byte("local"), 0o644))
	must(t, mount.UnmountAll(dir, 0))
	must(t, e.sn.Commit(e.ctx, "c2", "unpack"))

	info, err := e.sn.Stat(e.ctx, "c2")
	must(t, err)
	if _, ok := info.Labels[LabelLayerDigest]; ok || info.Parent != "c1" {
		t.Fatalf("Stat(c2) = %+v, want an ordinary layer on c1", info)
	}

	ms, err = e.sn.Prepare(e.ctx, "container", "c2")
	must(t, err)
	lowers := strings.Split(optionValue(ms[0], "lowerdir"), ":")
	if len(lowers) != 2 || lowers[1] != e.layers.dirs[d1] {
		t.Fatalf("lowerdir = %v, want [c2's fs dir, %s]", lowers, e.layers.dirs[d1])
	}
	rootfs := e.mountAt(t, ms)
	if got := readFile(t, filepath.Join(rootfs, "a")); got != "layer1" {
		t.Errorf("/a = %q, want layer1", got)
	}
	if got := readFile(t, filepath.Join(rootfs, "b")); got != "local" {
		t.Errorf("/b = %q, want the unpacked layer's content", got)
	}
}

func TestRemoveReleasesUnusedLayers(t *testing.T) {
	e := newRemoteEnv(t)
	d1, d2, d3 := buildChain(t, e)
	// The same layer under a second name (another chain, same diff).
	e.prepareRemote(t, "other", "c1", d3)

	_, err := e.sn.Prepare(e.ctx, "container", "c3")
	must(t, err)

	if err := e.sn.Remove(e.ctx, "c3"); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Remove of a parent in use = %v, want failed precondition", err)
	}
	must(t, e.sn.Remove(e.ctx, "container"))
	for _, step := range []struct {
		remove string
		want   []digest.Digest
	}{
		{"c3", nil}, // "other" still uses d3
		{"other", []digest.Digest{d3}},
		{"c2", []digest.Digest{d3, d2}},
		{"c1", []digest.Digest{d3, d2, d1}},
	} {
		must(t, e.sn.Remove(e.ctx, step.remove))
		if got := e.layers.releasedLayers(); !slices.Equal(got, step.want) {
			t.Errorf("after removing %s released = %v, want %v", step.remove, got, step.want)
		}
	}
}

func TestLayerDigestLabelIsProtected(t *testing.T) {
	e := newRemoteEnv(t)
	d1 := e.addLayer(t, "l1", file("a", "1"))
	e.prepareRemote(t, "c1", "", d1)

	// A wholesale label update (what containerd's metadata layer sends)
	// keeps the digest.
	info, err := e.sn.Update(e.ctx, snapshots.Info{Name: "c1", Labels: map[string]string{"x": "y"}})
	must(t, err)
	if info.Labels[LabelLayerDigest] != d1.String() || info.Labels["x"] != "y" {
		t.Errorf("after Update labels = %v, want x=y and the layer digest kept", info.Labels)
	}
	info, err = e.sn.Update(e.ctx, snapshots.Info{Name: "c1"}, "labels."+LabelLayerDigest)
	must(t, err)
	if info.Labels[LabelLayerDigest] != d1.String() {
		t.Errorf("after clearing the label: %v, want the layer digest kept", info.Labels)
	}

	// An ordinary snapshot cannot be turned into a remote one.
	_, err = e.sn.Prepare(e.ctx, "active", "", snapshots.WithLabels(map[string]string{LabelLayerDigest: d1.String()}))
	must(t, err)
	must(t, e.sn.Commit(e.ctx, "local", "active", snapshots.WithLabels(map[string]string{LabelLayerDigest: d1.String()})))
	info, err = e.sn.Update(e.ctx, snapshots.Info{Name: "local", Labels: map[string]string{LabelLayerDigest: d1.String()}})
	must(t, err)
	if _, ok := info.Labels[LabelLayerDigest]; ok {
		t.Errorf("ordinary snapshot labels = %v, want no layer digest", info.Labels)
	}
}

func TestCleanupRemovesOrphans(t *testing.T) {
	e := newRemoteEnv(t)
	_, err := e.sn.Prepare(e.ctx, "active", "")
	must(t, err)
	orphan := filepath.Join(e.root, "snapshotter", "snapshots", "new-123")
	must(t, os.MkdirAll(filepath.Join(orphan, "fs"), 0o755))
	must(t, e.sn.(snapshots.Cleaner).Cleanup(e.ctx))
	if _, err := os.Stat(orphan); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("orphan dir after Cleanup: %v, want removed", err)
	}
	if _, err := e.sn.Mounts(e.ctx, "active"); err != nil {
		t.Errorf("live snapshot after Cleanup: %v", err)
	}
}

// TestConcurrentRemoteUse runs the protocol, container prepares and removals
// from several goroutines at once (meant for -race) and checks the end state:
// every snapshot gone and the shared layer released.
func TestConcurrentRemoteUse(t *testing.T) {
	e := newRemoteEnv(t)
	base := e.addLayer(t, "base", file("a", "base"))
	top := e.addLayer(t, "top", file("b", "top"))

	const workers = 8
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for i := range workers {
		wg.Go(func() {
			name := string(rune('a' + i))
			// Every worker races to create the same base target.
			_, err := e.sn.Prepare(e.ctx, "extract-base-"+name, "", snapshots.WithLabels(map[string]string{
				LabelSnapshotRef: "base", LabelLayerDigest: base.String(),
			}))
			if !errdefs.IsAlreadyExists(err) {
				errs <- err
				return
			}
			target := "top-" + name
			_, err = e.sn.Prepare(e.ctx, "extract-"+target, "base", snapshots.WithLabels(map[string]string{
				LabelSnapshotRef: target, LabelLayerDigest: top.String(),
			}))
			if !errdefs.IsAlreadyExists(err) {
				errs <- err
				return
			}
			if _, err := e.sn.Prepare(e.ctx, "ctr-"+name, target); err != nil {
				errs <- err
				return
			}
			for _, key := range []string{"ctr-" + name, target} {
				if err := e.sn.Remove(e.ctx, key); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	must(t, e.sn.Remove(e.ctx, "base"))

	released := e.layers.releasedLayers()
	if !slices.Contains(released, top) || !slices.Contains(released, base) {
		t.Errorf("released = %v, want both %s and %s", released, top, base)
	}
	must(t, e.sn.Walk(e.ctx, func(_ context.Context, i snapshots.Info) error {
		t.Errorf("snapshot %q left", i.Name)
		return nil
	}))
}
