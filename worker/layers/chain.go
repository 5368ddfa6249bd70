package layers

import (
	"context"
	"fmt"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/worker/fs"
	"github.com/starlight-project/starlight/worker/snapshotter"
)

var _ snapshotter.LayerChainDeps = (*Registry)(nil)

// ChainDeps implements snapshotter.LayerChainDeps from the layer's tree:
// what containerd's unpacking of the layer takes from the layers below,
// which the layer's view cannot show. It is computed once per layer.
func (l *Registry) ChainDeps(ctx context.Context, d digest.Digest) (*snapshotter.ChainDeps, error) {
	ly, ok := l.get(d)
	if !ok {
		return nil, fmt.Errorf("layer %s is not known to this worker", d)
	}
	ly.mu.Lock()
	defer ly.mu.Unlock()
	if ly.deps != nil {
		return ly.deps, nil
	}
	tree, err := l.ReadTree(d)
	if err != nil {
		return nil, err
	}
	deps, err := fs.LayerChainDeps(tree.Entries)
	if err != nil {
		return nil, fmt.Errorf("layer %s: %w", d, err)
	}
	out := &snapshotter.ChainDeps{Whiteouts: deps.Whiteouts, BaseRemoved: deps.BaseRemoved}
	for _, id := range deps.Implicit {
		out.Implicit = append(out.Implicit, snapshotter.ImplicitDir{Path: id.Path, Declared: id.Declared, ChainParent: id.ChainParent})
	}
	ly.deps = out
	return out, nil
}
