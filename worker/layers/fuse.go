package layers

import (
	"io"
	"syscall"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/fs"
	"github.com/starlight-project/starlight/worker/store"
)

// FUSEMounter mounts layer views with package fs, reading contents from st.
// onOpen (may be nil) sees the first open of every file: the hook of
// startup traces.
func FUSEMounter(st *store.Store, onOpen func(layer digest.Digest, name string)) Mounter {
	return func(mountpoint string, tree *api.LayerTree) (io.Closer, error) {
		// A worker that crashed leaves its FUSE mounts behind, dead
		// ("transport endpoint is not connected"): detach them first.
		_ = syscall.Unmount(mountpoint, syscall.MNT_DETACH)
		m, err := fs.Mount(mountpoint, *tree, fs.Options{Store: st, OnOpen: onOpen})
		if err != nil {
			return nil, err
		}
		return unmounter{m}, nil
	}
}

type unmounter struct{ m *fs.MountedLayer }

func (u unmounter) Close() error { return u.m.Unmount() }
