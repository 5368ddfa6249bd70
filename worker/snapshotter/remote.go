//go:build linux

package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/storage"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

// lower is one committed snapshot of a parent chain.
type lower struct {
	id    string        // storage id; names root/snapshots/<id>/fs for a local layer
	layer digest.Digest // remote layer digest, empty for a local layer
}

// commitRemote implements the remote half of Prepare: it commits target on
// parent as the remote layer d, without any directory of its own, and returns
// an error satisfying errdefs.IsAlreadyExists on success (and when target
// exists already), which tells the caller not to unpack the layer.
func (o *snapshotter) commitRemote(ctx context.Context, key, parent, target string, d digest.Digest, labels map[string]string) error {
	if err := d.Validate(); err != nil {
		return fmt.Errorf("layer digest %q of target %q: %v: %w", d, target, err, errdefs.ErrInvalidArgument)
	}
	var usage snapshots.Usage
	if u, ok := o.layers.(LayerUsager); ok {
		var err error
		if usage, err = u.Usage(ctx, d); err != nil {
			// Usage is informational; a remote layer must not fail on it.
			log.G(ctx).WithError(err).WithField("layer", d).Warn("cannot get remote layer usage, reporting zero")
			usage = snapshots.Usage{}
		}
	}
	committed := make(map[string]string, len(labels)+1)
	for k, v := range labels {
		committed[k] = v
	}
	committed[LabelLayerDigest] = d.String()

	var exists bool
	if err := o.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, info, _, err := storage.GetInfo(ctx, target)
		if err == nil {
			exists = true
			if info.Parent != parent {
				// containerd's metadata layer checks the parent and fails
				// the pull; log here to help diagnose it.
				log.G(ctx).WithFields(log.Fields{"target": target, "parent": parent, "existing_parent": info.Parent}).
					Warn("remote snapshot target exists with another parent")
			}
			return nil
		}
		if !errdefs.IsNotFound(err) {
			return err
		}
		// Create and commit in one transaction: nobody ever sees the
		// temporary active snapshot.
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent, withLabels(committed)); err != nil {
			return fmt.Errorf("failed to create snapshot: %w", err)
		}
		if _, err := storage.CommitActive(ctx, key, target, usage, withLabels(committed)); err != nil {
			return fmt.Errorf("failed to commit remote snapshot %s: %w", target, err)
		}
		return nil
	}); err != nil {
		return err
	}
	if !exists {
		log.G(ctx).WithFields(log.Fields{"target": target, "parent": parent, "layer": d}).Debug("committed remote snapshot")
	}
	return fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
}

// layerDigest returns the remote layer a snapshot is, or "" for a local one.
func layerDigest(info snapshots.Info) (digest.Digest, error) {
	v := info.Labels[LabelLayerDigest]
	if v == "" {
		return "", nil
	}
	d, err := digest.Parse(v)
	if err != nil {
		return "", fmt.Errorf("snapshot %q has an invalid %s label: %w", info.Name, LabelLayerDigest, err)
	}
	return d, nil
}

// parentChain returns the committed snapshots under parent, nearest first.
// It must run inside a metadata transaction.
func (o *snapshotter) parentChain(ctx context.Context, parent string) ([]lower, error) {
	var chain []lower
	for name := parent; name != ""; {
		id, info, _, err := storage.GetInfo(ctx, name)
		if err != nil {
			return nil, fmt.Errorf("parent snapshot %q: %w", name, err)
		}
		d, err := layerDigest(info)
		if err != nil {
			return nil, err
		}
		chain = append(chain, lower{id: id, layer: d})
		name = info.Parent
	}
	return chain, nil
}

// traced identifies a traced active snapshot for resolveLowers.
type traced struct {
	key    string
	labels map[string]string
}

// traceOf returns the trace of the snapshot key, nil if it is not traced.
func (o *snapshotter) traceOf(key string, info snapshots.Info) *traced {
	if o.tracer == nil || info.Labels[LabelTraced] == "" {
		return nil
	}
	return &traced{key: key, labels: info.Labels}
}

// remoteLayers returns the remote layers of a chain, in chain order.
func remoteLayers(chain []lower) []digest.Digest {
	var out []digest.Digest
	for _, l := range chain {
		if l.layer != "" {
			out = append(out, l.layer)
		}
	}
	return out
}

// lowerDirs are the overlay lower directories of a snapshot, nearest
// first, and the data-only directories below them (see LayerDataDirs).
type lowerDirs struct {
	dirs []string
	data []string
}

// resolveLowers returns the directories of a parent chain, nearest first,
// with the chain fixes of remote layers (see LayerChainDeps).
// The remote layers of a traced snapshot (tr not nil) are its private
// views. It calls Layers.Dir, so it must not run inside a metadata
// transaction.
func (o *snapshotter) resolveLowers(ctx context.Context, chain []lower, tr *traced) (lowerDirs, error) {
	dirs := make([]string, len(chain))
	var (
		private []string
		data    []string
	)
	if tr != nil {
		remote := remoteLayers(chain)
		var err error
		if private, err = o.tracer.TracedDirs(ctx, tr.key, tr.labels, remote); err != nil {
			return lowerDirs{}, fmt.Errorf("traced views of %s: %w", tr.key, err)
		}
		if len(private) != len(remote) {
			return lowerDirs{}, fmt.Errorf("traced views of %s: %d directories for %d layers", tr.key, len(private), len(remote))
		}
	}
	for i, l := range chain {
		if l.layer == "" {
			dirs[i] = o.upperPath(l.id)
			continue
		}
		var (
			dir, dd string
			err     error
		)
		if tr != nil {
			dir, private = private[0], private[1:]
			err = checkLowerDir(l.layer, dir)
		} else {
			dir, dd, err = o.layerDir(ctx, l.layer)
		}
		if err != nil {
			return lowerDirs{}, err
		}
		dirs[i] = dir
		if dd != "" && !slices.Contains(data, dd) {
			data = append(data, dd)
		}
	}
	dirs, err := o.withChainFixes(ctx, chain, dirs)
	if err != nil {
		return lowerDirs{}, err
	}
	return lowerDirs{dirs: dirs, data: data}, nil
}

// layerDir returns the directory of a remote layer and, for a directory of
// metadata-only files, the data directory it needs below.
func (o *snapshotter) layerDir(ctx context.Context, d digest.Digest) (dir, data string, err error) {
	if o.layers == nil {
		return "", "", fmt.Errorf("snapshot refers to remote layer %s but the snapshotter has no layer provider: %w", d, errdefs.ErrFailedPrecondition)
	}
	unlock, err := o.layerLocks.lock(ctx, d.String())
	if err != nil {
		return "", "", err
	}
	if dl, ok := o.layers.(LayerDataDirs); ok && o.dataLayers {
		dir, data, err = dl.DirAndData(ctx, d)
	} else {
		dir, err = o.layers.Dir(ctx, d)
	}
	unlock()
	if err != nil {
		return "", "", fmt.Errorf("layer %s: %w", d, err)
	}
	if err := checkLowerDir(d, dir); err != nil {
		return "", "", err
	}
	if data != "" {
		if err := checkLowerDir(d, data); err != nil {
			return "", "", err
		}
	}
	return dir, data, nil
}

// checkLowerDir checks a layer directory before it goes into a comma- and
// colon-separated overlay option list, which has no escaping.
func checkLowerDir(d digest.Digest, dir string) error {
	if !filepath.IsAbs(dir) || strings.ContainsAny(dir, ",:") {
		return fmt.Errorf("layer %s: directory %q is not usable as an overlay lower dir", d, dir)
	}
	return nil
}

// releaseIfUnused calls Layers.Release when no snapshot refers to d any more.
// Holding d's lock across the check and the release keeps a concurrent
// Layers.Dir for a new snapshot of d from being undone: that call either
// happens first (and the new snapshot is counted) or after the release (and
// mounts the layer again).
func (o *snapshotter) releaseIfUnused(ctx context.Context, d digest.Digest) {
	if o.layers == nil {
		return
	}
	unlock, err := o.layerLocks.lock(ctx, d.String())
	if err != nil {
		log.G(ctx).WithError(err).WithField("layer", d).Warn("layer not released")
		return
	}
	defer unlock()
	errUsed := errors.New("used")
	err = o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(_ context.Context, info snapshots.Info) error {
			if info.Labels[LabelLayerDigest] == d.String() {
				return errUsed
			}
			return nil
		})
	})
	switch {
	case errors.Is(err, errUsed):
	case err != nil:
		log.G(ctx).WithError(err).WithField("layer", d).Warn("cannot tell whether layer is still used; not released")
	default:
		log.G(ctx).WithField("layer", d).Debug("releasing remote layer")
		o.layers.Release(ctx, d)
	}
}

// buildMounts returns the mounts of an active or view snapshot whose parent
// chain lives in lowers, nearest parent first.
func (o *snapshotter) buildMounts(kind snapshots.Kind, id string, lowers lowerDirs) []mount.Mount {
	if len(lowers.dirs) == 0 {
		// No parent: overlay needs a lower dir, so bind the upper dir.
		ro := "rw"
		if kind == snapshots.KindView {
			ro = "ro"
		}
		return []mount.Mount{{Type: "bind", Source: o.upperPath(id), Options: []string{ro, "rbind"}}}
	}
	if kind == snapshots.KindView && len(lowers.dirs) == 1 && len(lowers.data) == 0 {
		return []mount.Mount{{Type: "bind", Source: lowers.dirs[0], Options: []string{"ro", "rbind"}}}
	}
	options := append([]string(nil), o.options...)
	if kind == snapshots.KindActive {
		options = append(options,
			"workdir="+o.workPath(id),
			"upperdir="+o.upperPath(id),
		)
	}
	lowerdir := "lowerdir=" + strings.Join(lowers.dirs, ":")
	if len(lowers.data) > 0 {
		// Data-only layers, below the others: only the metadata-only
		// files of materialised layers reach them.
		lowerdir += "::" + strings.Join(lowers.data, "::")
		options = append(options, "metacopy=on")
	}
	// Without an upper dir (a view), overlayfs mounts read-only.
	options = append(options, lowerdir)
	return []mount.Mount{{Type: "overlay", Source: "overlay", Options: options}}
}
