// Package gc is the worker's garbage collector of layers and contents.
package gc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/layers"
	"github.com/starlight-project/starlight/worker/snapshotter"
	"github.com/starlight-project/starlight/worker/store"
)

// Collector is the worker's garbage collector. A layer is garbage when no
// image record names it and no snapshot is made of it; a content is
// garbage when it belonged to a garbage layer and no remaining layer's
// tree lists it. Contents are shared by digest across layers and images,
// so the count is taken over every remaining persisted tree: removing an
// image never removes a content another image still uses.
//
// A collection runs alone (mu) and blocks the pulls (Images.BlockPulls), so that a
// pull is never between announcing the layers it holds and recording the
// layers it receives: contents a running pull expects, or relies on
// because it told the registry it had them, belong to layers an image
// record names, and stay. A layer the snapshotter resolved (a Prepare, e.g.
// of a CRI pull, about to commit a snapshot of it) is pinned until its
// snapshot exists, and one resolved after the collection listed the
// snapshots is spared too (layers.Registry.RemoveIdle).
type Collector struct {
	layers *layers.Registry
	store  *store.Store
	sn     snapshots.Snapshotter
	images Images

	mu sync.Mutex
}

// GCResult is what a collection removed.
type GCResult struct {
	Layers   int
	Contents int
	Bytes    int64
}

// Images is what the collector needs of the image records (the puller).
type Images interface {
	// UsedLayers returns the layers that image records name.
	UsedLayers() map[digest.Digest]bool
	// BlockPulls keeps every pull out of the window between announcing
	// the layers it holds and recording those it receives, until
	// unblock is called.
	BlockPulls() (unblock func())
	// ForgetDeleted drops the records of images containerd deleted.
	ForgetDeleted(ctx context.Context) ([]string, error)
}

// Interval is how often Run collects without a cue: containerd deleting
// an image (kubelet's image garbage collection) releases snapshots, which
// cues a collection, but a record whose image was deleted before the
// worker ran needs the periodic one.
const Interval = 5 * time.Minute

// New returns the collector of a worker's state.
func New(l *layers.Registry, st *store.Store, sn snapshots.Snapshotter, images Images) *Collector {
	return &Collector{layers: l, store: st, sn: sn, images: images}
}

// Run collects whenever a layer was released (no snapshot uses it any
// more), and every Interval, until ctx is done. Removing an image collects at once (Collect).
func (c *Collector) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.layers.Released():
		case <-time.After(Interval):
		}
		if _, err := c.Collect(ctx); err != nil && ctx.Err() == nil {
			log.G(ctx).WithError(err).Warn("garbage collection")
		}
	}
}

// Collect removes the garbage layers and contents.
func (c *Collector) Collect(ctx context.Context) (GCResult, error) {
	var res GCResult
	c.mu.Lock()
	defer c.mu.Unlock()
	// The layers of images containerd deleted are no longer held by their
	// record; containerd being unreachable only delays that. Asked before
	// the pulls are blocked: it may wait for containerd.
	fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	if _, err := c.images.ForgetDeleted(fctx); err != nil {
		log.G(ctx).WithError(err).Warn("garbage collection: cannot tell which images containerd deleted")
	}
	cancel()
	defer c.images.BlockPulls()()

	// Layers resolved for a snapshot from now on are spared (RemoveIdle):
	// the listing below may miss their snapshots.
	epoch := c.layers.Epoch()
	used := c.images.UsedLayers()
	if err := c.sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		if v := info.Labels[snapshotter.LabelLayerDigest]; v != "" {
			used[digest.Digest(v)] = true
		}
		return nil
	}); err != nil {
		return res, fmt.Errorf("listing snapshots: %w", err)
	}
	var garbage []digest.Digest
	for _, d := range c.layers.Digests(false) {
		if !used[d] {
			garbage = append(garbage, d)
		}
	}
	if len(garbage) == 0 {
		return res, nil
	}

	// Remove the garbage layers first; a layer that turns out to be in use
	// (resolved meanwhile) stays, and so do its contents.
	var (
		errs    []error
		removed []*api.LayerTree
	)
	for _, d := range garbage {
		tree, err := c.layers.ReadTree(d)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("layer %s: %w", d, err))
			continue
		}
		ok, err := c.layers.RemoveIdle(ctx, d, epoch)
		if err != nil {
			errs = append(errs, err)
		}
		if !ok {
			continue
		}
		res.Layers++
		if tree != nil {
			removed = append(removed, tree)
		}
	}

	// Every content a remaining layer lists stays.
	keep := make(map[string]bool)
	for _, d := range c.layers.Digests(false) {
		tree, err := c.layers.ReadTree(d)
		if err != nil {
			// Without its tree we cannot tell what it shares: keep
			// everything rather than guess.
			return res, errors.Join(append(errs, fmt.Errorf("layer %s: %w", d, err))...)
		}
		for _, dg := range treeContents(tree) {
			keep[dg] = true
		}
	}
	for _, tree := range removed {
		for _, dg := range treeContents(tree) {
			if keep[dg] {
				continue
			}
			keep[dg] = true // once
			size := int64(0)
			if p, err := c.store.Path(digest.Digest(dg)); err == nil {
				if fi, err := os.Stat(p); err == nil {
					size = fi.Size()
				}
			}
			if err := c.store.Remove(digest.Digest(dg)); err != nil {
				errs = append(errs, err)
				continue
			}
			if size > 0 {
				res.Contents++
				res.Bytes += size
			}
		}
	}
	log.G(ctx).WithFields(log.Fields{"layers": res.Layers, "contents": res.Contents, "bytes": res.Bytes}).Info("garbage collected")
	return res, errors.Join(errs...)
}

// treeContents lists the contents of a tree's regular files.
func treeContents(t *api.LayerTree) []string {
	var out []string
	for i := range t.Entries {
		e := &t.Entries[i]
		if e.Type == api.TypeReg && e.Size > 0 && e.Digest != "" {
			out = append(out, e.Digest)
		}
	}
	return out
}
