package daemon

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

// Layers is the worker's registry of converted layers. For every layer a
// bundle header described it keeps, under root/<hex>/:
//
//	tree.json        the layer's file tree (api.LayerTree), written once
//	complete         a marker: every content of the tree is in the store
//	original-<hex>   a marker: this layer replaces the pushed (gzip) layer
//	                 sha256:<hex>, as a bundle header said (a CRI pull
//	                 names layers by their pushed digests)
//	mnt/             the mount point of the layer's view, mounted on demand
//
// It implements snapshotter.Layers: the snapshotter resolves a Prepare to a
// known layer and asks for its directory when it mounts a rootfs. The
// complete layers form the inventory a delta request sends as Have.
type Layers struct {
	root   string
	store  ContentChecker
	mount  Mounter
	mu     sync.Mutex
	layers map[digest.Digest]*layer
	// originals maps a pushed layer digest to the converted layer that
	// replaces it.
	originals map[digest.Digest]digest.Digest
	// epoch counts Resolve and Unpin calls; see removeIdle.
	epoch uint64
	// OnRelease, if set, is called after a layer was released (no
	// snapshot uses it any more): the garbage collector's cue.
	OnRelease func(digest.Digest)
	// Fetcher, if set, is asked for the layers of an image a CRI pull is
	// unpacking when its layer is not known yet.
	Fetcher CRIFetcher
}

// CRIFetcher fetches the bundle header of the image a Kubernetes (CRI)
// pull is unpacking, so that its layers and their pushed digests become
// known. FetchCRI returns once they are recorded (the contents keep
// streaming in the background), or with the reason it cannot provide them.
type CRIFetcher interface {
	FetchCRI(ctx context.Context, imageRef string, manifest digest.Digest) error
}

type layer struct {
	// mu serialises mounting and unmounting of this layer.
	mu       sync.Mutex
	usage    snapshots.Usage
	complete bool
	mnt      io.Closer
	// pins counts Resolves whose snapshot is not committed yet; epoch is
	// the Layers epoch of the last Resolve or Unpin; removing is set
	// while the collector removes the layer. All three under Layers.mu.
	pins     int
	epoch    uint64
	removing bool
}

var _ snapshotter.Layers = (*Layers)(nil)
var _ snapshotter.LayerUsager = (*Layers)(nil)
var _ snapshotter.LayerUnpinner = (*Layers)(nil)

// OpenLayers loads the layer registry at root. Trees that do not parse are
// reported and ignored (they are written atomically, so that only happens
// if someone edited them).
func OpenLayers(ctx context.Context, root string, store ContentChecker, mount Mounter) (*Layers, error) {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("opening layer registry: %w", err)
	}
	l := &Layers{root: root, store: store, mount: mount, layers: make(map[digest.Digest]*layer),
		originals: make(map[digest.Digest]digest.Digest)}
	dirs, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("opening layer registry: %w", err)
	}
	for _, de := range dirs {
		d := digest.NewDigestFromEncoded(digest.SHA256, de.Name())
		if d.Validate() != nil {
			continue
		}
		tree, err := l.readTree(d)
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

func (l *Layers) path(d digest.Digest, elem ...string) string {
	// d is always a validated sha256 digest here: its hex is a safe name.
	return filepath.Join(append([]string{l.root, d.Encoded()}, elem...)...)
}

func (l *Layers) readTree(d digest.Digest) (*api.LayerTree, error) {
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
func (l *Layers) Add(t *api.LayerTree) error {
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
		if err := writeFileAtomic(l.path(d, "tree.json"), func(w io.Writer) error {
			return json.NewEncoder(w).Encode(t)
		}); err != nil {
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
func (l *Layers) Known(d digest.Digest) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, ok := l.layers[d]
	return ok
}

func (l *Layers) get(d digest.Digest) (*layer, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	ly, ok := l.layers[d]
	return ly, ok
}

// Resolve implements snapshotter.Layers: the Prepare labels name a layer
// whose tree is known. Through containerd only "containerd.io/snapshot/"
// labels arrive, hence the inherited form.
//
// A Kubernetes (CRI) pull names the layer by its pushed digest
// (cri.layer-digest), with the image being unpacked (cri.image-ref,
// cri.manifest-digest). A pushed digest a bundle header mapped to a
// converted layer resolves to that layer. Otherwise the Fetcher fetches the
// image's header from its Starlight registry (the first layer of an image
// waits for it, the others find their mapping), and when it cannot,
// Resolve declines and containerd downloads and unpacks the layer itself.
//
// A resolved layer is pinned until Unpin, so that the garbage collector
// does not remove it before its snapshot exists.
func (l *Layers) Resolve(ctx context.Context, labels map[string]string) (digest.Digest, bool) {
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
	if c, ok := l.pin(d, true); ok {
		return c, true
	}
	ref, manifest := labels[snapshotter.LabelCRIImageRef], labels[snapshotter.LabelCRIManifestDigest]
	logger := log.G(ctx).WithFields(log.Fields{"layer": d, "image": ref, "manifest": manifest})
	if l.Fetcher == nil || ref == "" || manifest == "" {
		logger.Debug("CRI layer unknown, containerd unpacks it")
		return "", false
	}
	md, err := api.ParseDigest(manifest)
	if err != nil {
		logger.WithError(err).Info("invalid CRI manifest digest, containerd unpacks the layer")
		return "", false
	}
	if err := l.Fetcher.FetchCRI(ctx, ref, md); err != nil {
		logger.WithError(err).Info("Starlight cannot provide the layer, containerd downloads and unpacks it")
		return "", false
	}
	if c, ok := l.pin(d, true); ok {
		logger.WithField("converted", c).Debug("CRI layer resolved")
		return c, true
	}
	logger.Info("the Starlight image does not name this pushed layer (registry without originalDigest?), containerd downloads and unpacks it")
	return "", false
}

// pin returns the known layer d designates (d itself, or with original
// the converted layer replacing the pushed layer d) and pins it.
func (l *Layers) pin(d digest.Digest, original bool) (digest.Digest, bool) {
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
func (l *Layers) Unpin(ctx context.Context, d digest.Digest) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ly, ok := l.layers[d]; ok && ly.pins > 0 {
		ly.pins--
		l.epoch++
		ly.epoch = l.epoch
	}
}

// Original returns the converted layer that replaces the pushed layer d.
func (l *Layers) Original(d digest.Digest) (digest.Digest, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	c, ok := l.originals[d]
	return c, ok
}

// Epoch returns the current resolve epoch. A collection takes it before it
// lists the snapshots; removeIdle then spares every layer resolved since,
// whose snapshot the listing may have missed.
func (l *Layers) Epoch() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.epoch
}

// Dir implements snapshotter.Layers: it mounts the layer's view if it is
// not mounted yet.
func (l *Layers) Dir(ctx context.Context, d digest.Digest) (string, error) {
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
	tree, err := l.readTree(d)
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
func (l *Layers) Release(ctx context.Context, d digest.Digest) {
	ly, ok := l.get(d)
	if !ok {
		return
	}
	if l.OnRelease != nil {
		defer l.OnRelease(d)
	}
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

// Remove forgets a layer: it is unmounted and its tree deleted. The
// caller (the garbage collector) makes sure nothing uses it.
func (l *Layers) Remove(ctx context.Context, d digest.Digest) error {
	_, err := l.removeIdle(ctx, d, ^uint64(0))
	return err
}

// removeIdle removes the layer like Remove unless it is pinned or was
// resolved or unpinned after epoch (a snapshot of it may exist that the
// caller did not see), and reports whether it did.
func (l *Layers) removeIdle(ctx context.Context, d digest.Digest, epoch uint64) (bool, error) {
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
func (l *Layers) Usage(ctx context.Context, d digest.Digest) (snapshots.Usage, error) {
	ly, ok := l.get(d)
	if !ok {
		return snapshots.Usage{}, fmt.Errorf("layer %s is not known to this worker", d)
	}
	return ly.usage, nil
}

// MountAll mounts every known layer, as at worker start: snapshots made
// before a restart point at these directories.
func (l *Layers) MountAll(ctx context.Context) {
	for _, d := range l.digests(false) {
		if _, err := l.Dir(ctx, d); err != nil {
			log.G(ctx).WithError(err).WithField("layer", d).Warn("remounting layer")
		}
	}
}

// Close unmounts every view this registry mounted.
func (l *Layers) Close() error {
	var errs []error
	for _, d := range l.digests(false) {
		ly, _ := l.get(d)
		ly.mu.Lock()
		if ly.mnt != nil {
			if err := ly.mnt.Close(); err != nil {
				errs = append(errs, fmt.Errorf("unmounting layer %s: %w", d, err))
			} else {
				ly.mnt = nil
			}
		}
		ly.mu.Unlock()
	}
	return errors.Join(errs...)
}

func (l *Layers) digests(completeOnly bool) []digest.Digest {
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
func (l *Layers) Inventory() []string {
	ds := l.digests(true)
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.String()
	}
	return out
}

// Complete reports whether the layer is marked complete.
func (l *Layers) Complete(d digest.Digest) bool {
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
func (l *Layers) CheckComplete(t *api.LayerTree) (bool, error) {
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
	return true, nil
}

// writeFileAtomic writes a file through a temporary file and a rename, so
// that a crash never leaves a partial file under the final name.
func writeFileAtomic(path string, fill func(io.Writer) error) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := fill(f); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
