//go:build linux

package snapshotter

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/metadata"
	"github.com/containerd/containerd/snapshots"
	bolt "go.etcd.io/bbolt"
)

// TestRemoteThroughContainerdMetadata drives the remote-snapshotter protocol
// through containerd's metadata layer, the way containerd's unpacker (and
// CRI) and a worker talking to containerd do: it filters labels, namespaces
// keys and finds the committed target by walking the backend.
func TestRemoteThroughContainerdMetadata(t *testing.T) {
	e := newRemoteEnv(t)
	d1, d2, d3 := buildChain(t, e) // also populates the backend directly

	bdb, err := bolt.Open(filepath.Join(e.root, "containerd-meta.db"), 0o600, nil)
	must(t, err)
	t.Cleanup(func() { bdb.Close() })
	db := metadata.NewDB(bdb, nil, map[string]snapshots.Snapshotter{"starlight": e.sn})
	must(t, db.Init(e.ctx))
	sn := db.Snapshotter("starlight")

	// LabelLayerDigest does not cross containerd's metadata layer; the
	// inherited form does. Targets c1..c3 exist in the backend already (as
	// after a pull in another namespace): the metadata layer adopts them.
	var parent string
	for i, d := range []string{d1.String(), d2.String(), d3.String()} {
		target := []string{"c1", "c2", "c3"}[i]
		_, err := sn.Prepare(e.ctx, "extract-"+target, parent, snapshots.WithLabels(map[string]string{
			LabelSnapshotRef:          target,
			LabelInheritedLayerDigest: d,
		}))
		if !errdefs.IsAlreadyExists(err) {
			t.Fatalf("Prepare %s through metadata = %v, want already exists", target, err)
		}
		parent = target
	}
	// A new layer on top, committed by the protocol through the metadata.
	d4 := e.addLayer(t, "l4", file("four", "layer4"))
	_, err = sn.Prepare(e.ctx, "extract-c4", "c3", snapshots.WithLabels(map[string]string{
		LabelSnapshotRef:          "c4",
		LabelInheritedLayerDigest: d4.String(),
	}))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare c4 through metadata = %v, want already exists", err)
	}
	info, err := sn.Stat(e.ctx, "c4")
	must(t, err)
	if info.Kind != snapshots.KindCommitted || info.Parent != "c3" {
		t.Fatalf("Stat(c4) through metadata = %+v, want committed on c3", info)
	}

	// containerd replaces all backend labels on update; the layer stays remote.
	_, err = sn.Update(e.ctx, snapshots.Info{Name: "c4", Labels: map[string]string{"containerd.io/gc.root": "x"}})
	must(t, err)

	ms, err := sn.Prepare(e.ctx, "container", "c4")
	must(t, err)
	if got, want := optionValue(ms[0], "lowerdir"), e.layers.dirs[d4]+":"+e.layers.dirs[d3]; !strings.HasPrefix(got, want) {
		t.Fatalf("lowerdir = %q, want it to start with %q", got, want)
	}
	rootfs := e.mountAt(t, ms)
	checkMerged(t, rootfs)
	if got := readFile(t, filepath.Join(rootfs, "four")); got != "layer4" {
		t.Errorf("/four = %q, want layer4", got)
	}
	if _, err := os.Stat(filepath.Join(rootfs, "b")); !os.IsNotExist(err) {
		t.Errorf("/b = %v, want whited out", err)
	}
}
