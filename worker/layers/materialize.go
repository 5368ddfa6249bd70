package layers

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/fs"
	"github.com/starlight-project/starlight/worker/snapshotter"
)

// A complete layer leaves FUSE: it is materialised as root/<hex>/fs, a
// plain directory of the layer's tree whose regular files are overlayfs
// metadata-only files redirecting to the store's contents (fs.Materialize),
// and new snapshots get that directory, with the store's content directory
// as a data-only layer below (snapshotter.LayerDataDirs). Nothing on a
// container's path then depends on the worker process, and the store stays
// the only copy of each content: a materialised layer takes one inode per
// file and no data blocks. (Hard links to the store's files could not be
// exact: every name of a content would share one owner, mode, xattrs and
// link count.)

// DataStore is the content store as materialised layers need it.
type DataStore interface {
	ContentChecker
	// DataDir is the directory of the complete contents, DataPath(d)
	// the path of content d inside it, starting with "/".
	DataDir() string
	DataPath(d digest.Digest) (string, error)
}

// Option configures a Registry.
type Option func(*Registry)

// Materialize makes the registry materialise complete layers (see
// DirAndData). The kernel must support overlayfs data-only layers
// (snapshotter.DataLayersSupported); the worker checks at start.
func Materialize(store DataStore) Option {
	return func(l *Registry) { l.data = store }
}

var _ snapshotter.LayerDataDirs = (*Registry)(nil)

const materializedDir = "fs"

// DirAndData implements snapshotter.LayerDataDirs: a complete layer's
// materialised directory (made now if the layer completed before the
// worker materialised layers) and the store's content directory, or else
// the layer's FUSE view (Dir).
func (l *Registry) DirAndData(ctx context.Context, d digest.Digest) (string, string, error) {
	if l.data != nil {
		dir, err := l.materialized(ctx, d)
		if err != nil {
			log.G(ctx).WithError(err).WithField("layer", d).Warn("complete layer not materialised; serving it through FUSE")
		} else if dir != "" {
			return dir, l.data.DataDir(), nil
		}
	}
	dir, err := l.Dir(ctx, d)
	return dir, "", err
}

// Materialized reports whether layer d is materialised.
func (l *Registry) Materialized(d digest.Digest) bool {
	ly, ok := l.get(d)
	if !ok {
		return false
	}
	ly.mu.Lock()
	defer ly.mu.Unlock()
	return ly.materialized
}

// materialized returns the materialised directory of layer d, making it if
// the layer is complete; "" if it is not complete.
func (l *Registry) materialized(ctx context.Context, d digest.Digest) (string, error) {
	ly, ok := l.get(d)
	if !ok {
		return "", fmt.Errorf("layer %s is not known to this worker", d)
	}
	l.mu.Lock()
	complete := ly.complete
	l.mu.Unlock()
	if !complete {
		return "", nil
	}
	ly.mu.Lock()
	defer ly.mu.Unlock()
	dir := l.path(d, materializedDir)
	if ly.materialized {
		return dir, nil
	}
	tree, err := l.ReadTree(d)
	if err != nil {
		return "", err
	}
	// Contents a crash tore were removed from the store when it opened:
	// a layer is only handed out materialised with all of them.
	for i := range tree.Entries {
		e := &tree.Entries[i]
		if e.Type == api.TypeReg && e.Size > 0 && !l.data.Has(digest.Digest(e.Digest)) {
			return "", fmt.Errorf("content %s of %s is not in the store", e.Digest, e.Name)
		}
	}
	if _, err := os.Stat(dir); err == nil {
		ly.materialized = true
		return dir, nil
	}
	tmp := l.path(d, materializedDir+".tmp")
	if err := os.RemoveAll(tmp); err != nil {
		return "", err
	}
	if err := fs.Materialize(tmp, *tree, l.data.DataPath); err != nil {
		os.RemoveAll(tmp)
		return "", err
	}
	if err := os.Rename(tmp, dir); err != nil {
		os.RemoveAll(tmp)
		return "", err
	}
	ly.materialized = true
	log.G(ctx).WithField("layer", d).Debug("materialised complete layer")
	return dir, nil
}
