//go:build linux

package snapshotter

import (
	"context"
	"os"
	"testing"

	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/testsuite"
	"github.com/opencontainers/go-digest"
)

// requireRoot skips a test that needs mounts, saying so loudly.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: this test mounts overlayfs and needs root")
	}
}

// noLayers is a Layers that can provide nothing: every Prepare takes the
// ordinary overlayfs path.
type noLayers struct{}

func (noLayers) Resolve(context.Context, map[string]string) (digest.Digest, bool) { return "", false }
func (noLayers) Dir(_ context.Context, d digest.Digest) (string, error) {
	panic("Dir called on a layer never resolved: " + d.String())
}
func (noLayers) Release(_ context.Context, d digest.Digest) {
	panic("Release called on a layer never resolved: " + d.String())
}

// TestSnapshotterSuite runs containerd's snapshotter conformance suite, which
// proves that everything outside remote layers behaves like the overlayfs
// snapshotter.
func TestSnapshotterSuite(t *testing.T) {
	requireRoot(t)
	for name, opts := range map[string][]Opt{
		"default":            nil,
		"AsynchronousRemove": {AsynchronousRemove},
	} {
		t.Run(name, func(t *testing.T) {
			// The suite keys overlayfs-specific expectations on the name
			// "overlayfs" (renaming a lower directory fails with EXDEV unless
			// redirect_dir is on). This snapshotter is overlayfs and must
			// behave exactly like containerd's, so it is tested as such.
			testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
				sn, err := New(root, noLayers{}, opts...)
				if err != nil {
					return nil, nil, err
				}
				return sn, sn.Close, nil
			})
		})
	}
}
