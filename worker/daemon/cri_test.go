package daemon

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/config"
	"github.com/starlight-project/starlight/worker/internal/fakeregistry"
	"github.com/starlight-project/starlight/worker/snapshotter"
)

// criLabels are the labels containerd's CRI plugin puts on the Prepare of
// a layer (through the unpacker: the chain ID as the snapshot ref).
func criLabels(ref string, manifest, layer digest.Digest, target string) map[string]string {
	return map[string]string{
		snapshotter.LabelSnapshotRef:       target,
		snapshotter.LabelCRIImageRef:       ref,
		snapshotter.LabelCRIManifestDigest: manifest.String(),
		snapshotter.LabelCRILayerDigest:    layer.String(),
	}
}

// TestCRIPrepareFetchesImage plays containerd's CRI unpacker against the
// worker's snapshotter: the Prepare of the first layer of an unknown image
// on a Starlight registry fetches the image's header (once, however many
// Prepares ask at the same time), every layer is then committed remotely
// (ErrAlreadyExists), the image shows in the worker's list and its
// contents arrive. Images the worker cannot provide fall back to an
// ordinary unpack.
func TestCRIPrepareFetchesImage(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIPPING: needs root (the snapshotter's overlay checks)")
	}
	dir, err := os.MkdirTemp("", "slc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	img, pushed, pushedLayers := fakeregistry.CRIImage(t)
	reg := &fakeregistry.Registry{Image: img, Refs: []string{"app@" + pushed.String()}, HeaderGate: make(chan struct{})}
	host := fakeregistry.Start(t, reg)
	w := startWorker(t, dir, config.Registry{Host: host, PlainHTTP: true})
	ref := host + "/app:v1"
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	sn := w.d.Snapshotter

	// Concurrent Prepares of the same image share one fetch, held up
	// here by the registry still planning.
	const n = 3
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = w.d.Puller.FetchCRI(ctx, ref, pushed)
		}()
	}
	for len(reg.Requests()) == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	close(reg.HeaderGate)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("fetch %d: %v", i, err)
		}
	}
	if reqs := reg.Requests(); len(reqs) != 1 || reqs[0].Reference != "app@"+pushed.String() {
		t.Fatalf("delta requests %+v, want one for app@%s", reqs, pushed)
	}

	// The unpacker's Prepares, base first, with the pushed layer digests.
	var parent string
	for i, l := range pushedLayers {
		target := fmt.Sprintf("chain-%d", i)
		_, err := sn.Prepare(ctx, "extract-"+target, parent, snapshots.WithLabels(criLabels(ref, pushed, l, target)))
		if !errdefs.IsAlreadyExists(err) {
			t.Fatalf("Prepare of layer %d: %v, want already exists", i, err)
		}
		info, err := sn.Stat(ctx, target)
		if err != nil {
			t.Fatal(err)
		}
		if got := info.Labels[snapshotter.LabelLayerDigest]; got != img.Layers[i].Digest {
			t.Errorf("layer %d committed as %q, want converted %s", i, got, img.Layers[i].Digest)
		}
		parent = target
	}
	if len(reg.Requests()) != 1 {
		t.Errorf("%d delta requests, want 1", len(reg.Requests()))
	}
	got := waitImage(t, w.client, ref, func(i api.WorkerImage) bool { return i.State == api.PullComplete })
	if !got.Complete || got.Namespace != "k8s.io" || got.Digest != img.ManifestDigest.String() || len(got.Layers) != 2 {
		t.Errorf("worker's record of the CRI image: %+v", got)
	}

	// Declined: an unknown host, and an image the registry cannot serve.
	// containerd then gets an empty snapshot to unpack into.
	for i, tc := range []struct {
		ref      string
		manifest digest.Digest
	}{
		{"unknown.example:5000/app:v1", digest.FromString("other manifest")},
		{host + "/app:v2", digest.FromString("not converted")},
	} {
		key := fmt.Sprintf("fallback-%d", i)
		mounts, err := sn.Prepare(ctx, key, "", snapshots.WithLabels(criLabels(tc.ref, tc.manifest,
			digest.FromString("some gzip layer"), "fallback-target")))
		if err != nil || len(mounts) == 0 {
			t.Errorf("Prepare of an image Starlight cannot provide (%s): %v, %v; want an ordinary snapshot", tc.ref, mounts, err)
			continue
		}
		if err := sn.Remove(ctx, key); err != nil {
			t.Error(err)
		}
	}
}
