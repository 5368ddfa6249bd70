// Package layers is the worker's registry of converted layers: the file
// tree of every layer a bundle header described, which of them are
// complete, the pushed layers they replace, and their FUSE views, mounted
// when a snapshot needs them (every known layer at start) and unmounted
// when no snapshot uses them any more (not when the worker stops: a kept
// view outlives it). It implements snapshotter.Layers.
package layers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/continuity"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/snapshotter"
)

// Mounter exposes a layer tree at a directory (a FUSE view backed by the
// content store) and returns what unmounts it.
type Mounter func(mountpoint string, tree *api.LayerTree) (io.Closer, error)

// ContentChecker reports whether a content is complete in the store.
type ContentChecker interface {
	Has(d digest.Digest) bool
}

// contentSyncer is implemented by a ContentChecker whose contents need an
// explicit sync to be durable (the store).
type contentSyncer interface {
	Sync() error
}

// Registry is the worker's registry of converted layers. For every layer a
// bundle header described it keeps, under root/<hex>/:
//
//	tree.json        the layer's file tree (api.LayerTree), written once
//	complete         a marker: every content of the tree is in the store
//	original-<hex>   a marker: this layer replaces the pushed (gzip) layer
//	                 sha256:<hex>, as a bundle header said (a CRI pull
//	                 names layers by their pushed digests)
//	mnt/             the mount point of the layer's view, mounted on demand
//	fuse/            what the next worker needs to take the view over
//	                 (a kept view outlives the worker; see FUSEMounter)
//
// It implements snapshotter.Layers: the snapshotter resolves a Prepare to a
// known layer and asks for its directory when it mounts a rootfs. The
// complete layers form the inventory a delta request sends as Have.
type Registry struct {
	root   string
	store  ContentChecker
	mount  Mounter
	mu     sync.Mutex
	layers map[digest.Digest]*layer
	// originals maps a pushed layer digest to the converted layer that
	// replaces it.
	originals map[digest.Digest]digest.Digest
	// epoch counts Resolve and Unpin calls; see RemoveIdle.
	epoch uint64
	// released receives (without blocking, coalesced) whenever a layer
	// was released: no snapshot uses it any more, the garbage
	// collector's cue.
	released chan struct{}
	// data, when set, is the store complete layers are materialised on
	// (Materialize).
	data DataStore
}

type layer struct {
	// mu serialises mounting and unmounting of this layer.
	mu       sync.Mutex
	usage    snapshots.Usage
	complete bool
	mnt      io.Closer
	// deps caches ChainDeps (under mu).
	deps *snapshotter.ChainDeps
	// materialized: root/<hex>/fs is made and checked (under mu).
	materialized bool
	// pins counts Resolves whose snapshot is not committed yet; epoch is
	// the Registry epoch of the last Resolve or Unpin; removing is set
	// while the collector removes the layer. All three under Registry.mu.
	pins     int
	epoch    uint64
	removing bool
}

var _ snapshotter.Layers = (*Registry)(nil)
var _ snapshotter.LayerUsager = (*Registry)(nil)
var _ snapshotter.LayerUnpinner = (*Registry)(nil)

// Open loads the layer registry at root. Trees that do not parse are
// reported and ignored (they are written atomically, so that only happens
// if someone edited them).
func Open(ctx context.Context, root string, store ContentChecker, mount Mounter, opts ...Option) (*Registry, error) {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("opening layer registry: %w", err)
	}
	l := &Registry{root: root, store: store, mount: mount, layers: make(map[digest.Digest]*layer),
		originals: make(map[digest.Digest]digest.Digest), released: make(chan struct{}, 1)}
	for _, o := range opts {
		o(l)
	}
	dirs, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("opening layer registry: %w", err)
	}
	for _, de := range dirs {
		d := digest.NewDigestFromEncoded(digest.SHA256, de.Name())
		if d.Validate() != nil {
			continue
		}
		tree, err := l.ReadTree(d)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			log.G(ctx).WithError(err).WithField("layer", d).Warn("ignoring unreadable layer tree")
			continue
		}
		_, cerr := os.Stat(l.path(d, "complete"))
		l.layers[d] = &layer{usage: treeUsage(tree), complete: cerr == nil}
		markers, _ := filepath.Glob(l.path(d, originalMarker+"*"))
		for _, m := range markers {
			o := digest.NewDigestFromEncoded(digest.SHA256, strings.TrimPrefix(filepath.Base(m), originalMarker))
			if o.Validate() == nil {
				l.originals[o] = d
			}
		}
	}
	return l, nil
}

// originalMarker prefixes the marker files naming the pushed layers a
// layer replaces.
const originalMarker = "original-"

func (l *Registry) path(d digest.Digest, elem ...string) string {
	// d is always a validated sha256 digest here: its hex is a safe name.
	return filepath.Join(append([]string{l.root, d.Encoded()}, elem...)...)
}

// ReadTree reads the recorded tree of layer d, validated.
func (l *Registry) ReadTree(d digest.Digest) (*api.LayerTree, error) {
	b, err := os.ReadFile(l.path(d, "tree.json"))
	if err != nil {
		return nil, err
	}
	var t api.LayerTree
	if err := json.Unmarshal(b, &t); err != nil {
		return nil, fmt.Errorf("layer %s: tree.json: %w", d, err)
	}
	if t.Digest != d.String() {
		return nil, fmt.Errorf("layer %s: tree.json describes %s", d, t.Digest)
	}
	for i := range t.Entries {
		if err := t.Entries[i].Validate(); err != nil {
			return nil, fmt.Errorf("layer %s: tree.json: %w", d, err)
		}
	}
	return &t, nil
}

func treeUsage(t *api.LayerTree) snapshots.Usage {
	u := snapshots.Usage{Inodes: int64(len(t.Entries))}
	for i := range t.Entries {
		u.Size += t.Entries[i].Size
	}
	return u
}

// Add records a layer's tree (validated by the bundle decoder). A layer is
// content addressed, so a tree already known is kept as is.
func (l *Registry) Add(t *api.LayerTree) error {
	d, err := api.ParseDigest(t.Digest)
	if err != nil {
		return fmt.Errorf("adding layer: %w", err)
	}
	var original digest.Digest
	if t.OriginalDigest != "" {
		if original, err = api.ParseDigest(t.OriginalDigest); err != nil {
			return fmt.Errorf("adding layer %s: original: %w", d, err)
		}
	}
	l.mu.Lock()
	_, known := l.layers[d]
	l.mu.Unlock()
	if !known {
		if err := os.MkdirAll(l.path(d), 0o700); err != nil {
			return fmt.Errorf("adding layer %s: %w", d, err)
		}
		b, err := json.Marshal(t)
		if err != nil {
			return fmt.Errorf("adding layer %s: %w", d, err)
		}
		if err := continuity.AtomicWriteFile(l.path(d, "tree.json"), b, 0o600); err != nil {
			return fmt.Errorf("adding layer %s: %w", d, err)
		}
	}
	// A known layer may replace one more pushed layer (the same tar
	// compressed differently converts to the same layer).
	if original != "" && original != d {
		if err := os.WriteFile(l.path(d, originalMarker+original.Encoded()), nil, 0o600); err != nil {
			return fmt.Errorf("adding layer %s: recording original %s: %w", d, original, err)
		}
	}
	l.mu.Lock()
	if _, ok := l.layers[d]; !ok {
		l.layers[d] = &layer{usage: treeUsage(t)}
	}
	if original != "" && original != d {
		l.originals[original] = d
	}
	l.mu.Unlock()
	return nil
}

// Known reports whether the layer's tree is recorded.
func (l *Registry) Known(d digest.Digest) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, ok := l.layers[d]
	return ok
}

func (l *Registry) get(d digest.Digest) (*layer, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	ly, ok := l.layers[d]
	return ly, ok
}

// Resolve implements snapshotter.Layers: the Prepare labels name a layer
// whose tree is known. Through containerd only "containerd.io/snapshot/"
// labels arrive, hence the inherited form. A Kubernetes (CRI) pull names
// the layer by its pushed digest (cri.layer-digest): a pushed digest a
// bundle header mapped to a converted layer resolves to that layer (package
// cri fetches the header of an image whose layers are not known yet).
//
// A resolved layer is pinned until Unpin, so that the garbage collector
// does not remove it before its snapshot exists.
func (l *Registry) Resolve(ctx context.Context, labels map[string]string) (digest.Digest, bool) {
	for _, key := range []string{snapshotter.LabelLayerDigest, snapshotter.LabelInheritedLayerDigest} {
		v, ok := labels[key]
		if !ok {
			continue
		}
		d, err := api.ParseDigest(v)
		if err != nil {
			log.G(ctx).WithError(err).WithField("label", key).Debug("ignoring invalid layer label")
			return "", false
		}
		return l.pin(d, false)
	}
	v, ok := labels[snapshotter.LabelCRILayerDigest]
	if !ok {
		return "", false
	}
	d, err := api.ParseDigest(v)
	if err != nil {
		log.G(ctx).WithError(err).WithField("label", snapshotter.LabelCRILayerDigest).Debug("ignoring invalid layer label")
		return "", false
	}
	return l.pin(d, true)
}

// pin returns the known layer d designates (d itself, or with original
// the converted layer replacing the pushed layer d) and pins it.
func (l *Registry) pin(d digest.Digest, original bool) (digest.Digest, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	ly, ok := l.layers[d]
	if !ok && original {
		if c, mapped := l.originals[d]; mapped {
			d = c
			ly, ok = l.layers[c]
		}
	}
	if !ok || ly.removing {
		return "", false
	}
	ly.pins++
	l.epoch++
	ly.epoch = l.epoch
	return d, true
}

// Unpin implements snapshotter.LayerUnpinner: the snapshot of a resolved
// layer is committed (or failed to be).
func (l *Registry) Unpin(ctx context.Context, d digest.Digest) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ly, ok := l.layers[d]; ok && ly.pins > 0 {
		ly.pins--
		l.epoch++
		ly.epoch = l.epoch
	}
}

// Original returns the converted layer that replaces the pushed layer d.
func (l *Registry) Original(d digest.Digest) (digest.Digest, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	c, ok := l.originals[d]
	return c, ok
}

// Epoch returns the current resolve epoch. A collection takes it before it
// lists the snapshots; RemoveIdle then spares every layer resolved since,
// whose snapshot the listing may have missed.
func (l *Registry) Epoch() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.epoch
}

// Dir implements snapshotter.Layers: it mounts the layer's view if it is
// not mounted yet.
func (l *Registry) Dir(ctx context.Context, d digest.Digest) (string, error) {
	ly, ok := l.get(d)
	if !ok {
		return "", fmt.Errorf("layer %s is not known to this worker", d)
	}
	ly.mu.Lock()
	defer ly.mu.Unlock()
	mnt := l.path(d, "mnt")
	if ly.mnt != nil {
		return mnt, nil
	}
	tree, err := l.ReadTree(d)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return "", fmt.Errorf("mounting layer %s: %w", d, err)
	}
	c, err := l.mount(mnt, tree)
	if err != nil {
		return "", fmt.Errorf("mounting layer %s: %w", d, err)
	}
	ly.mnt = c
	log.G(ctx).WithField("layer", d).WithField("mountpoint", mnt).Debug("mounted layer")
	return mnt, nil
}

// Release implements snapshotter.Layers: no snapshot uses the layer any
// more, so its view is unmounted. The tree stays known.
func (l *Registry) Release(ctx context.Context, d digest.Digest) {
	ly, ok := l.get(d)
	if !ok {
		return
	}
	defer l.notifyReleased()
	ly.mu.Lock()
	defer ly.mu.Unlock()
	if ly.mnt == nil {
		return
	}
	if err := ly.mnt.Close(); err != nil {
		log.G(ctx).WithError(err).WithField("layer", d).Warn("unmounting released layer")
		return
	}
	ly.mnt = nil
}

func (l *Registry) notifyReleased() {
	select {
	case l.released <- struct{}{}:
	default:
	}
}

// Released receives after a layer was released (no snapshot uses it any
// more); releases that happen before the receiver is ready coalesce.
func (l *Registry) Released() <-chan struct{} { return l.released }

// Remove forgets a layer: it is unmounted and its tree deleted. The
// caller (the garbage collector) makes sure nothing uses it.
func (l *Registry) Remove(ctx context.Context, d digest.Digest) error {
	_, err := l.RemoveIdle(ctx, d, ^uint64(0))
	return err
}

// RemoveIdle removes the layer like Remove unless it is pinned or was
// resolved or unpinned after epoch (a snapshot of it may exist that the
// caller did not see), and reports whether it did.
func (l *Registry) RemoveIdle(ctx context.Context, d digest.Digest, epoch uint64) (bool, error) {
	ly, ok := l.get(d)
	if !ok {
		return false, nil
	}
	ly.mu.Lock()
	defer ly.mu.Unlock()
	l.mu.Lock()
	if ly.pins > 0 || ly.epoch > epoch {
		l.mu.Unlock()
		return false, nil
	}
	// From here on Resolve does not hand the layer out.
	ly.removing = true
	l.mu.Unlock()
	if ly.mnt != nil {
		if err := ly.mnt.Close(); err != nil {
			l.mu.Lock()
			ly.removing = false
			l.mu.Unlock()
			return false, fmt.Errorf("removing layer %s: %w", d, err)
		}
		ly.mnt = nil
	}
	l.mu.Lock()
	delete(l.layers, d)
	for o, c := range l.originals {
		if c == d {
			delete(l.originals, o)
		}
	}
	l.mu.Unlock()
	if err := os.RemoveAll(l.path(d)); err != nil {
		return true, fmt.Errorf("removing layer %s: %w", d, err)
	}
	log.G(ctx).WithField("layer", d).Debug("removed layer")
	return true, nil
}

// Usage implements snapshotter.LayerUsager from the recorded tree.
func (l *Registry) Usage(ctx context.Context, d digest.Digest) (snapshots.Usage, error) {
	ly, ok := l.get(d)
	if !ok {
		return snapshots.Usage{}, fmt.Errorf("layer %s is not known to this worker", d)
	}
	return ly.usage, nil
}

// MountAll mounts every known layer, as at worker start: snapshots made
// before a restart point at these directories. A view an earlier worker
// left mounted is taken over (see FUSEMounter).
func (l *Registry) MountAll(ctx context.Context) {
	for _, d := range l.Digests(false) {
		if _, err := l.Dir(ctx, d); err != nil {
			log.G(ctx).WithError(err).WithField("layer", d).Warn("remounting layer")
		}
	}
}

// Close stops serving every view this registry mounted, as the worker
// stops: a view that can outlive the worker (Detacher) stays mounted for
// the next worker to take over, so the containers using it keep running;
// the others are unmounted.
func (l *Registry) Close() error {
	var errs []error
	for _, d := range l.Digests(false) {
		ly, _ := l.get(d)
		ly.mu.Lock()
		if ly.mnt != nil {
			var err error
			if dt, ok := ly.mnt.(Detacher); ok {
				err = dt.Detach()
			} else {
				err = ly.mnt.Close()
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("closing the view of layer %s: %w", d, err))
			} else {
				ly.mnt = nil
			}
		}
		ly.mu.Unlock()
	}
	return errors.Join(errs...)
}

// Digests lists the known layers (only the complete ones with
// completeOnly), sorted.
func (l *Registry) Digests(completeOnly bool) []digest.Digest {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []digest.Digest
	for d, ly := range l.layers {
		if !completeOnly || ly.complete {
			out = append(out, d)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// Inventory lists the complete layers, the Have of a delta request.
func (l *Registry) Inventory() []string {
	ds := l.Digests(true)
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.String()
	}
	return out
}

// Complete reports whether the layer is marked complete.
func (l *Registry) Complete(d digest.Digest) bool {
	ly, ok := l.get(d)
	if !ok {
		return false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return ly.complete
}

// CheckComplete marks the layer complete if every content of its tree is
// in the store, and reports whether it is.
func (l *Registry) CheckComplete(t *api.LayerTree) (bool, error) {
	d, err := api.ParseDigest(t.Digest)
	if err != nil {
		return false, err
	}
	ly, ok := l.get(d)
	if !ok {
		return false, fmt.Errorf("layer %s is not known to this worker", d)
	}
	l.mu.Lock()
	done := ly.complete
	l.mu.Unlock()
	if done {
		return true, nil
	}
	for i := range t.Entries {
		e := &t.Entries[i]
		if e.Type == api.TypeReg && e.Size > 0 && !l.store.Has(digest.Digest(e.Digest)) {
			return false, nil
		}
	}
	// Complete layers are offered to registries as held (Have): their
	// contents must be on disk first.
	if cs, ok := l.store.(contentSyncer); ok {
		if err := cs.Sync(); err != nil {
			return false, fmt.Errorf("marking layer %s complete: %w", d, err)
		}
	}
	f, err := os.Create(l.path(d, "complete"))
	if err != nil {
		return false, fmt.Errorf("marking layer %s complete: %w", d, err)
	}
	f.Close()
	l.mu.Lock()
	ly.complete = true
	l.mu.Unlock()
	if l.data != nil {
		// New containers get the layer without FUSE from now on.
		if _, err := l.materialized(context.Background(), d); err != nil {
			log.L.WithError(err).WithField("layer", d).Warn("complete layer not materialised; serving it through FUSE")
		}
	}
	return true, nil
}
