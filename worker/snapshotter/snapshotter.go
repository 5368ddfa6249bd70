//go:build linux

package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/overlay/overlayutils"
	"github.com/containerd/containerd/snapshots/storage"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

const (
	// LabelLayerDigest on a Prepare names the converted layer this snapshot
	// is (a Starlight remote layer). On a committed snapshot it marks the
	// snapshot as remote: its tree is Layers.Dir(digest).
	LabelLayerDigest = "starlight.io/layer.digest"

	// LabelInheritedLayerDigest is the form of LabelLayerDigest that
	// containerd's metadata layer forwards to a proxy snapshotter (only
	// "containerd.io/snapshot/" labels cross it). The snapshotter itself only
	// hands it to Layers.Resolve; it is listed here so that the worker and its
	// Layers agree on one name.
	LabelInheritedLayerDigest = "containerd.io/snapshot/starlight.layer-digest"

	// LabelSnapshotRef is the standard remote-snapshotter label: the name of
	// the committed snapshot that a Prepare should produce.
	LabelSnapshotRef = "containerd.io/snapshot.ref"

	// CRI's remote-snapshotter labels, set by containerd's CRI plugin on
	// every layer Prepare of a Kubernetes pull.
	LabelCRILayerDigest    = "containerd.io/snapshot/cri.layer-digest"
	LabelCRIImageRef       = "containerd.io/snapshot/cri.image-ref"
	LabelCRIManifestDigest = "containerd.io/snapshot/cri.manifest-digest"
)

// Layers resolves remote layers to local directories: the worker's FUSE
// views of converted layers, complete or still streaming in.
type Layers interface {
	// Resolve returns the layer digest a Prepare's labels designate, if this
	// worker can provide it (labels carry LabelLayerDigest, or CRI labels that
	// the worker can map; the worker decides).
	Resolve(ctx context.Context, labels map[string]string) (digest.Digest, bool)
	// Dir returns the directory that exposes the layer's tree, mounting it if
	// needed.
	Dir(ctx context.Context, layer digest.Digest) (string, error)
	// Release tells that no snapshot uses the layer any more (may unmount).
	Release(ctx context.Context, layer digest.Digest)
}

// LayerUsager is optionally implemented by a Layers to report the resources a
// remote layer takes. It is called once, when the remote snapshot is
// committed, and must be cheap (the size of the tree as announced by the
// bundle header, not a walk of a FUSE mount). Without it remote snapshots
// report zero usage, as stargz-snapshotter's do.
type LayerUsager interface {
	Usage(ctx context.Context, layer digest.Digest) (snapshots.Usage, error)
}

// LayerUnpinner is optionally implemented by a Layers whose Resolve pins
// the layer it returns (so that the worker's garbage collector leaves it
// alone while nothing refers to it yet). The snapshotter calls Unpin once
// the remote snapshot of that layer is committed, or failed to be: from
// then on the snapshot itself keeps the layer.
type LayerUnpinner interface {
	Unpin(ctx context.Context, layer digest.Digest)
}

// LabelTraced marks an active snapshot whose remote lowers are the private,
// traced views a Tracer gives it. Like LabelLayerDigest it is set only by
// the snapshotter.
const LabelTraced = "starlight.io/traced"

// Tracer is optionally given to New (WithTracer) to trace containers: a
// traced container's rootfs stacks private views of its remote layers,
// whose accesses are that container's alone, instead of the views shared
// by every container. The snapshotter calls it outside metadata
// transactions, except Trace, which must be quick and must not call the
// snapshotter.
type Tracer interface {
	// Trace decides whether the active snapshot key, being prepared with
	// labels on a parent chain holding the remote layers (nearest parent
	// first), is traced.
	Trace(ctx context.Context, key string, labels map[string]string, layers []digest.Digest) bool
	// TracedDirs returns the private directories of layers for the traced
	// snapshot key, in the same order, mounting them if needed. It is
	// called when the snapshot is prepared and whenever its mounts are
	// asked for (the container is about to start).
	TracedDirs(ctx context.Context, key string, labels map[string]string, layers []digest.Digest) ([]string, error)
	// Untrace tells that the traced snapshot key is gone (removed, or
	// committed): its trace is over and its private views may go.
	Untrace(ctx context.Context, key string)
}

type config struct {
	asyncRemove  bool
	mountOptions []string
	tracer       Tracer
}

// Opt configures the snapshotter.
type Opt func(*config) error

// AsynchronousRemove defers removal of filesystem content until Cleanup is
// called, as in the overlayfs snapshotter.
func AsynchronousRemove(c *config) error {
	c.asyncRemove = true
	return nil
}

// WithTracer traces the containers t chooses.
func WithTracer(t Tracer) Opt {
	return func(c *config) error {
		c.tracer = t
		return nil
	}
}

// WithMountOptions adds options to every overlay mount (not to bind mounts).
func WithMountOptions(options []string) Opt {
	return func(c *config) error {
		c.mountOptions = append(c.mountOptions, options...)
		return nil
	}
}

type snapshotter struct {
	root        string
	ms          *storage.MetaStore
	layers      Layers
	asyncRemove bool
	options     []string
	tracer      Tracer
	// layerLocks serialises Layers.Dir against Layers.Release per digest.
	layerLocks keyedMutex
	// dataLayers: overlayfs here mounts data-only layers (LayerDataDirs).
	dataLayers bool
}

// New returns a snapshotter storing its metadata in root/metadata.db and its
// local layers and upper dirs under root/snapshots. layers may be nil, in
// which case the snapshotter behaves like the overlayfs snapshotter.
func New(root string, layers Layers, opts ...Opt) (snapshots.Snapshotter, error) {
	var c config
	for _, opt := range opts {
		if err := opt(&c); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("create snapshotter root: %w", err)
	}
	supportsDType, err := fs.SupportsDType(root)
	if err != nil {
		return nil, fmt.Errorf("check d_type support of %s: %w", root, err)
	}
	if !supportsDType {
		return nil, fmt.Errorf("%s does not support d_type; overlayfs needs it (xfs must be formatted with ftype=1)", root)
	}
	if err := overlayutils.Supported(root); err != nil {
		return nil, fmt.Errorf("overlayfs is not usable on %s: %w", root, err)
	}
	if err := os.Mkdir(filepath.Join(root, "snapshots"), 0o700); err != nil && !os.IsExist(err) {
		return nil, fmt.Errorf("create snapshots dir: %w", err)
	}
	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"))
	if err != nil {
		return nil, fmt.Errorf("open snapshot metadata: %w", err)
	}

	options := append([]string(nil), c.mountOptions...)
	if !hasOption(options, "userxattr") {
		// Needed (and only accepted) when running in a user namespace.
		userxattr, err := overlayutils.NeedsUserXAttr(root)
		if err != nil {
			log.L.WithError(err).Warnf("cannot detect whether overlayfs needs \"userxattr\", assuming %v", userxattr)
		}
		if userxattr {
			options = append(options, "userxattr")
		}
	}
	// index=off, as the overlayfs snapshotter and stargz-snapshotter do: with
	// the index on, overlayfs records file handles of lower inodes and checks
	// them on later mounts, which a FUSE view (no stable file handles)
	// cannot satisfy.
	if !hasOption(options, "index") && supportsIndex() {
		options = append(options, "index=off")
	}

	var dataLayers bool
	if _, ok := layers.(LayerDataDirs); ok {
		if err := DataLayersSupported(root, options); err != nil {
			log.L.WithError(err).Info("complete layers stay FUSE views")
		} else {
			dataLayers = true
		}
	}
	return &snapshotter{
		dataLayers:  dataLayers,
		root:        root,
		ms:          ms,
		layers:      layers,
		asyncRemove: c.asyncRemove,
		options:     options,
		tracer:      c.tracer,
	}, nil
}

// hasOption reports whether options contain key, alone or as key=value.
func hasOption(options []string, key string) bool {
	for _, o := range options {
		if o == key || strings.HasPrefix(o, key+"=") {
			return true
		}
	}
	return false
}

func supportsIndex() bool {
	_, err := os.Stat("/sys/module/overlay/parameters/index")
	return err == nil
}

// Stat returns the info for an active or committed snapshot by name or key.
func (o *snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return info, err
}

// Update updates the labels of a snapshot. LabelLayerDigest and LabelTraced
// cannot be set, changed or removed: they decide how the snapshot is
// mounted, and containerd's
// metadata layer replaces all labels of a backend snapshot on every update
// with only those it forwards.
func (o *snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (newInfo snapshots.Info, err error) {
	err = o.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, cur, _, err := storage.GetInfo(ctx, info.Name)
		if err != nil {
			return err
		}
		paths := make([]string, 0, len(fieldpaths))
		for _, p := range fieldpaths {
			if !internalLabels[strings.TrimPrefix(p, "labels.")] || !strings.HasPrefix(p, "labels.") {
				paths = append(paths, p)
			}
		}
		if len(fieldpaths) > 0 && len(paths) == 0 {
			newInfo = cur // only the protected label was named: nothing to do
			return nil
		}
		labels := make(map[string]string, len(info.Labels)+1)
		for k, v := range info.Labels {
			labels[k] = v
		}
		for k := range internalLabels {
			if v, ok := cur.Labels[k]; ok {
				labels[k] = v
			} else {
				delete(labels, k)
			}
		}
		info.Labels = labels
		newInfo, err = storage.UpdateInfo(ctx, info, paths...)
		return err
	})
	return newInfo, err
}

// Usage returns the resources taken by the snapshot identified by key. For
// active snapshots it scans the upper dir; for committed ones it returns the
// value recorded at commit.
func (o *snapshotter) Usage(ctx context.Context, key string) (usage snapshots.Usage, err error) {
	var (
		id   string
		info snapshots.Info
	)
	if err := o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		return snapshots.Usage{}, err
	}
	if info.Kind == snapshots.KindActive {
		du, err := fs.DiskUsage(ctx, o.upperPath(id))
		if err != nil {
			return snapshots.Usage{}, fmt.Errorf("disk usage of snapshot %q: %w", key, err)
		}
		usage = snapshots.Usage(du)
	}
	return usage, nil
}

// Prepare creates an active snapshot, or, following the remote-snapshotter
// protocol, commits a remote layer and returns ErrAlreadyExists.
func (o *snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	base, err := applyOpts(opts)
	if err != nil {
		return nil, err
	}
	if target := base.Labels[LabelSnapshotRef]; target != "" && o.layers != nil {
		if d, ok := o.layers.Resolve(ctx, base.Labels); ok {
			err := o.commitRemote(ctx, key, parent, target, d, base.Labels)
			if u, ok := o.layers.(LayerUnpinner); ok {
				u.Unpin(ctx, d)
			}
			return nil, err
		}
	}
	return o.createSnapshot(ctx, snapshots.KindActive, key, parent, base.Labels)
}

// View creates a read-only snapshot of parent.
func (o *snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	base, err := applyOpts(opts)
	if err != nil {
		return nil, err
	}
	return o.createSnapshot(ctx, snapshots.KindView, key, parent, base.Labels)
}

// Mounts returns the mounts of an active or view snapshot.
func (o *snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	var (
		s     storage.Snapshot
		info  snapshots.Info
		chain []lower
	)
	if err := o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		s, err = storage.GetSnapshot(ctx, key)
		if err != nil {
			return fmt.Errorf("failed to get active mount: %w", err)
		}
		_, info, _, err = storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		chain, err = o.parentChain(ctx, info.Parent)
		return err
	}); err != nil {
		return nil, err
	}
	lowers, err := o.resolveLowers(ctx, chain, o.traceOf(key, info))
	if err != nil {
		return nil, err
	}
	return o.buildMounts(s.Kind, s.ID, lowers), nil
}

// Commit turns an active snapshot into an ordinary committed layer.
func (o *snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	base, err := applyOpts(opts)
	if err != nil {
		return err
	}
	var id string
	if err := o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		id, _, _, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		return err
	}
	// Scan outside the write transaction: it can take a while on a big layer
	// and must not block every other snapshot operation meanwhile.
	usage, err := fs.DiskUsage(ctx, o.upperPath(id))
	if err != nil {
		return fmt.Errorf("disk usage of snapshot %q: %w", key, err)
	}
	var traced bool
	err = o.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		// The key may have been removed and reused while we were scanning.
		if id2, _, _, err := storage.GetInfo(ctx, key); err != nil {
			return err
		} else if id2 != id {
			return fmt.Errorf("snapshot %q changed during commit: %w", key, errdefs.ErrFailedPrecondition)
		}
		if _, info, _, err := storage.GetInfo(ctx, key); err == nil {
			traced = info.Labels[LabelTraced] != ""
		}
		if _, err := storage.CommitActive(ctx, key, name, snapshots.Usage(usage), withLabels(stripInternal(base.Labels))); err != nil {
			return fmt.Errorf("failed to commit snapshot %s: %w", key, err)
		}
		return nil
	})
	if err == nil && traced && o.tracer != nil {
		o.tracer.Untrace(ctx, key)
	}
	return err
}

// Remove abandons the snapshot identified by key. If it was the last snapshot
// referring to a remote layer, the layer is released.
func (o *snapshotter) Remove(ctx context.Context, key string) (err error) {
	var (
		removals []string
		layer    digest.Digest
		traced   bool
	)
	if err := o.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, info, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return fmt.Errorf("failed to remove snapshot %s: %w", key, err)
		}
		if layer, err = layerDigest(info); err != nil {
			return err
		}
		traced = info.Labels[LabelTraced] != ""
		if _, _, err := storage.Remove(ctx, key); err != nil {
			return fmt.Errorf("failed to remove snapshot %s: %w", key, err)
		}
		if !o.asyncRemove {
			if removals, err = o.getCleanupDirectories(ctx); err != nil {
				return fmt.Errorf("unable to get directories for removal: %w", err)
			}
		}
		return nil
	}); err != nil {
		return err
	}

	// The removal is committed: failures from here on are only logged.
	for _, dir := range removals {
		if err := os.RemoveAll(dir); err != nil {
			log.G(ctx).WithError(err).WithField("path", dir).Warn("failed to remove directory")
		}
	}
	if traced && o.tracer != nil {
		o.tracer.Untrace(ctx, key)
	}
	if layer != "" {
		o.releaseIfUnused(ctx, layer)
	}
	return nil
}

// Walk calls fn for every snapshot matching the filters.
func (o *snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, fn, filters...)
	})
}

// Cleanup removes the directories of removed or abandoned snapshots.
func (o *snapshotter) Cleanup(ctx context.Context) error {
	var dirs []string
	// A write transaction keeps snapshots from being created while scanning.
	if err := o.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		dirs, err = o.getCleanupDirectories(ctx)
		return err
	}); err != nil {
		return err
	}
	for _, dir := range dirs {
		if err := os.RemoveAll(dir); err != nil {
			log.G(ctx).WithError(err).WithField("path", dir).Warn("failed to remove directory")
		}
	}
	return nil
}

// Close closes the metadata store. Layers stay mounted: they belong to the
// caller.
func (o *snapshotter) Close() error {
	return o.ms.Close()
}

func (o *snapshotter) getCleanupDirectories(ctx context.Context) ([]string, error) {
	ids, err := storage.IDMap(ctx)
	if err != nil {
		return nil, err
	}
	snapshotDir := filepath.Join(o.root, "snapshots")
	entries, err := os.ReadDir(snapshotDir)
	if err != nil {
		return nil, err
	}
	var cleanup []string
	for _, e := range entries {
		if _, ok := ids[e.Name()]; ok {
			continue
		}
		cleanup = append(cleanup, filepath.Join(snapshotDir, e.Name()))
	}
	return cleanup, nil
}

func (o *snapshotter) createSnapshot(ctx context.Context, kind snapshots.Kind, key, parent string, labels map[string]string) (_ []mount.Mount, err error) {
	var (
		s        storage.Snapshot
		info     snapshots.Info
		chain    []lower
		td, path string
	)
	defer func() {
		if err != nil && td != "" {
			if err1 := os.RemoveAll(td); err1 != nil {
				log.G(ctx).WithError(err1).Warn("failed to cleanup temp snapshot directory")
			}
		}
	}()

	snapshotDir := filepath.Join(o.root, "snapshots")
	if err := o.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		td, err = prepareDirectory(snapshotDir, kind)
		if err != nil {
			return fmt.Errorf("failed to create prepare snapshot dir: %w", err)
		}
		labels := stripInternal(labels)
		if kind == snapshots.KindActive && o.tracer != nil && parent != "" {
			// Decided once, at creation, and recorded: the snapshot's
			// mounts must stay the same for its whole life.
			if chain, err := o.parentChain(ctx, parent); err == nil {
				if remote := remoteLayers(chain); len(remote) > 0 && o.tracer.Trace(ctx, key, labels, remote) {
					labels = withLabel(labels, LabelTraced, "true")
				}
			}
		}
		s, err = storage.CreateSnapshot(ctx, kind, key, parent, withLabels(labels))
		if err != nil {
			return fmt.Errorf("failed to create snapshot: %w", err)
		}
		info = snapshots.Info{Name: key, Labels: labels}
		if chain, err = o.parentChain(ctx, parent); err != nil {
			return err
		}
		// The upper dir's root takes its owner from the parent's, as in the
		// overlayfs snapshotter; a remote parent is looked at below, outside
		// the transaction.
		if len(chain) > 0 && chain[0].layer == "" {
			if err := copyOwner(filepath.Join(td, "fs"), o.upperPath(chain[0].id)); err != nil {
				return err
			}
		}
		path = filepath.Join(snapshotDir, s.ID)
		if err := os.Rename(td, path); err != nil {
			return fmt.Errorf("failed to rename: %w", err)
		}
		td = ""
		return nil
	}); err != nil {
		if path != "" {
			if err1 := os.RemoveAll(path); err1 != nil {
				log.G(ctx).WithError(err1).WithField("path", path).Error("failed to reclaim snapshot directory, directory may need removal")
			}
		}
		return nil, err
	}

	lowers, err := o.resolveLowers(ctx, chain, o.traceOf(key, info))
	if err == nil && len(chain) > 0 && chain[0].layer != "" {
		err = copyOwner(o.upperPath(s.ID), lowers.dirs[0])
	}
	if err != nil {
		// The snapshot is committed in the metadata; take it back so the
		// caller can retry with the same key.
		if rerr := o.Remove(ctx, key); rerr != nil {
			log.G(ctx).WithError(rerr).WithField("key", key).Warn("failed to remove snapshot after mount failure")
		}
		return nil, err
	}
	return o.buildMounts(kind, s.ID, lowers), nil
}

func prepareDirectory(snapshotDir string, kind snapshots.Kind) (string, error) {
	td, err := os.MkdirTemp(snapshotDir, "new-")
	if err != nil {
		return "", fmt.Errorf("failed to create temp dir: %w", err)
	}
	if err := os.Mkdir(filepath.Join(td, "fs"), 0o755); err != nil {
		return td, err
	}
	if kind == snapshots.KindActive {
		if err := os.Mkdir(filepath.Join(td, "work"), 0o711); err != nil {
			return td, err
		}
	}
	return td, nil
}

// copyOwner gives dst the uid and gid of src.
func copyOwner(dst, src string) error {
	st, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("failed to stat parent: %w", err)
	}
	stat := st.Sys().(*syscall.Stat_t)
	if err := os.Lchown(dst, int(stat.Uid), int(stat.Gid)); err != nil {
		return fmt.Errorf("failed to chown: %w", err)
	}
	return nil
}

func (o *snapshotter) upperPath(id string) string {
	return filepath.Join(o.root, "snapshots", id, "fs")
}

func (o *snapshotter) workPath(id string) string {
	return filepath.Join(o.root, "snapshots", id, "work")
}

func applyOpts(opts []snapshots.Opt) (snapshots.Info, error) {
	var base snapshots.Info
	for _, opt := range opts {
		if err := opt(&base); err != nil {
			return snapshots.Info{}, err
		}
	}
	return base, nil
}

// withLabels sets exactly labels (snapshots.WithLabels merges).
func withLabels(labels map[string]string) snapshots.Opt {
	return func(info *snapshots.Info) error {
		info.Labels = labels
		return nil
	}
}

// internalLabels are set by the snapshotter only.
var internalLabels = map[string]bool{LabelLayerDigest: true, LabelTraced: true}

// stripInternal returns labels without the internal labels: only the
// remote path may mark a snapshot as remote, only the Tracer as traced.
func stripInternal(labels map[string]string) map[string]string {
	found := false
	for k := range internalLabels {
		if _, ok := labels[k]; ok {
			found = true
		}
	}
	if !found {
		return labels
	}
	out := make(map[string]string, len(labels))
	for k, v := range labels {
		if !internalLabels[k] {
			out[k] = v
		}
	}
	return out
}

// withLabel returns a copy of labels with k set to v.
func withLabel(labels map[string]string, k, v string) map[string]string {
	out := make(map[string]string, len(labels)+1)
	for k2, v2 := range labels {
		out[k2] = v2
	}
	out[k] = v
	return out
}
