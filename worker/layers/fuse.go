package layers

import (
	"io"
	"path/filepath"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/fs"
	"github.com/starlight-project/starlight/worker/store"
)

// FUSEMounter mounts layer views with package fs, reading contents from st.
// onOpen (may be nil) sees the first open of every file: the hook of
// startup traces. With a keeper (may be nil), every view outlives the
// worker: its connection is kept there, the state a takeover needs in the
// layer's fuse/ directory, and the next worker's mount of the layer takes
// the view over (the containers using it keep running). The closer it
// returns also implements Detacher.
func FUSEMounter(st *store.Store, onOpen func(layer digest.Digest, name string), keeper fs.FDKeeper) Mounter {
	return func(mountpoint string, tree *api.LayerTree) (io.Closer, error) {
		opts := fs.Options{Store: st, OnOpen: onOpen}
		if keeper != nil {
			opts.Keeper = keeper
			opts.StateDir = filepath.Join(filepath.Dir(mountpoint), "fuse")
		}
		m, err := fs.Mount(mountpoint, *tree, opts)
		if err != nil {
			return nil, err
		}
		return view{m}, nil
	}
}

// Detacher is implemented by a view that can outlive the worker: Detach
// stops serving it and leaves it mounted for the next worker.
type Detacher interface {
	Detach() error
}

type view struct{ m *fs.MountedLayer }

func (v view) Close() error  { return v.m.Unmount() }
func (v view) Detach() error { return v.m.Detach() }
