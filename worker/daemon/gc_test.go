package daemon

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/namespaces"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/client"
	"github.com/starlight-project/starlight/worker/config"
	"github.com/starlight-project/starlight/worker/importer"
	"github.com/starlight-project/starlight/worker/internal/fakeregistry"
)

// TestRemoveImageKeepsSharedContents removes one of two images that share
// contents (through different layers, from different registries): the
// contents only it used are gone, the shared ones stay, and the other
// image still runs.
func TestRemoveImageKeepsSharedContents(t *testing.T) {
	requireRuntime(t)
	dir, err := os.MkdirTemp("", "slg")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	shared := []byte("shared by both images\n")
	onlyA := []byte("only in image A\n")
	onlyB := []byte("only in image B\n")
	imgA := fakeregistry.BuildImage(t, 256<<10, append(busyboxLayer(t),
		fakeregistry.File{Name: "etc", Type: api.TypeDir, Mode: 0o755},
		fakeregistry.File{Name: "etc/shared.txt", Type: api.TypeReg, Mode: 0o644, Data: shared},
		fakeregistry.File{Name: "etc/a.txt", Type: api.TypeReg, Mode: 0o644, Data: onlyA},
	))
	imgB := fakeregistry.BuildImage(t, 256<<10, append(busyboxLayer(t),
		fakeregistry.File{Name: "etc", Type: api.TypeDir, Mode: 0o755},
		fakeregistry.File{Name: "etc/shared.txt", Type: api.TypeReg, Mode: 0o644, Data: shared},
		fakeregistry.File{Name: "etc/b.txt", Type: api.TypeReg, Mode: 0o644, Data: onlyB},
	))
	if imgA.Layers[0].Digest == imgB.Layers[0].Digest {
		t.Fatal("test images share their layer")
	}
	hostA := fakeregistry.Start(t, &fakeregistry.Registry{Image: imgA})
	hostB := fakeregistry.Start(t, &fakeregistry.Registry{Image: imgB})
	refA, refB := hostA+"/app:v1", hostB+"/app:v1"
	w := startWorker(t, dir, config.Registry{Host: hostA, PlainHTTP: true}, config.Registry{Host: hostB, PlainHTTP: true})
	sock := startContainerd(t, filepath.Join(dir, "ctrd"), w.cfg.Address)
	ctx := namespaces.WithNamespace(context.Background(), "default")
	for _, ref := range []string{refA, refB} {
		if err := w.client.Pull(ctx, api.PullRequest{Ref: ref, Wait: true}, nil); err != nil {
			t.Fatalf("pull %s: %v", ref, err)
		}
	}
	// A container of A has come and gone.
	if out := ctr(t, sock, "run", "--rm", "--snapshotter", importer.SnapshotterName, refA, "a-"+randomID(), "/bin/cat", "/etc/a.txt"); out != string(onlyA) {
		t.Fatalf("container of A printed %q", out)
	}
	has := func(data []byte) bool { return w.d.Store.Has(digest.FromBytes(data)) }
	if !has(onlyA) || !has(onlyB) || !has(shared) {
		t.Fatal("contents missing after the pulls")
	}

	res, err := w.client.RemoveImage(ctx, refA, "")
	if err != nil {
		t.Fatalf("rmi: %v", err)
	}
	if res.Layers != 1 || res.Contents != 1 || res.Bytes != int64(len(onlyA)) {
		t.Fatalf("rmi freed %+v, want A's layer and its one unique content", res)
	}
	if has(onlyA) {
		t.Error("the content only A used is still in the store")
	}
	busybox, _ := os.ReadFile("/bin/busybox")
	if !has(shared) || !has(onlyB) || !has(busybox) {
		t.Error("a content B uses was removed")
	}
	if w.d.Layers.Known(digest.Digest(imgA.Layers[0].Digest)) || !w.d.Layers.Known(digest.Digest(imgB.Layers[0].Digest)) {
		t.Error("layer registry after rmi: want A's layer gone and B's kept")
	}
	if _, err := os.Stat(filepath.Join(w.cfg.Root, "layers", digest.Digest(imgA.Layers[0].Digest).Encoded())); !os.IsNotExist(err) {
		t.Errorf("A's layer directory: %v", err)
	}
	if _, err := w.client.Image(ctx, refA, ""); err == nil {
		t.Error("the worker still lists A")
	}
	cc, err := containerd.New(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	if _, err := cc.GetImage(ctx, refA); !errdefs.IsNotFound(err) {
		t.Errorf("A in containerd: %v", err)
	}
	if out := ctr(t, sock, "run", "--rm", "--snapshotter", importer.SnapshotterName, refB, "b-"+randomID(), "/bin/cat", "/etc/shared.txt", "/etc/b.txt"); out != string(shared)+string(onlyB) {
		t.Fatalf("container of B printed %q", out)
	}
	// B is complete and dedups against what is left.
	if imgs, err := w.client.Images(ctx); err != nil || len(imgs) != 1 || imgs[0].Ref != refB || !imgs[0].Complete {
		t.Fatalf("images after rmi: %+v, %v", imgs, err)
	}
	if _, err := w.client.RemoveImage(ctx, refA, ""); err == nil {
		t.Error("removing A twice succeeded")
	}

	// An image whose container still exists keeps its layer until the
	// container goes.
	cB, err := client.NewContainer(ctx, cc, client.ContainerOptions{Ref: refB, ID: "b-" + randomID(), Snapshotter: importer.SnapshotterName})
	if err != nil {
		t.Fatal(err)
	}
	if res, err := w.client.RemoveImage(ctx, refB, "default"); err != nil || res.Layers != 0 {
		t.Fatalf("rmi of an image in use: %+v, %v", res, err)
	}
	if !has(onlyB) || !w.d.Layers.Known(digest.Digest(imgB.Layers[0].Digest)) {
		t.Fatal("the layer of a container was collected")
	}
	if err := cB.Delete(ctx, containerd.WithSnapshotCleanup); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for has(onlyB) || has(shared) || w.d.Layers.Known(digest.Digest(imgB.Layers[0].Digest)) {
		if time.Now().After(deadline) {
			t.Fatal("B's layer and contents outlived its last container")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestCollectSparesContentsAPullReliesOn removes an image while another
// pull has told the registry it holds that image's layer: the registry
// leaves out the contents they share, so the collector must not take them
// before the pulling image's layers are recorded.
func TestCollectSparesContentsAPullReliesOn(t *testing.T) {
	requireRuntime(t)
	dir, err := os.MkdirTemp("", "slp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	shared := []byte("shared by both images\n")
	imgA := fakeregistry.BuildImage(t, 256<<10, []fakeregistry.File{
		{Name: "shared.txt", Type: api.TypeReg, Mode: 0o644, Data: shared},
		{Name: "a.txt", Type: api.TypeReg, Mode: 0o644, Data: []byte("only in A\n")},
	})
	imgB := fakeregistry.BuildImage(t, 256<<10, []fakeregistry.File{
		{Name: "shared.txt", Type: api.TypeReg, Mode: 0o644, Data: shared},
		{Name: "b.txt", Type: api.TypeReg, Mode: 0o644, Data: []byte("only in B\n")},
	})
	imgB.Others = imgA.Layers
	regB := &fakeregistry.Registry{Image: imgB, HeaderGate: make(chan struct{})}
	hostA := fakeregistry.Start(t, &fakeregistry.Registry{Image: imgA})
	hostB := fakeregistry.Start(t, regB)
	refA, refB := hostA+"/app:v1", hostB+"/app:v1"
	w := startWorker(t, dir, config.Registry{Host: hostA, PlainHTTP: true}, config.Registry{Host: hostB, PlainHTTP: true})
	startContainerd(t, filepath.Join(dir, "ctrd"), w.cfg.Address)
	ctx := namespaces.WithNamespace(context.Background(), "default")
	if err := w.client.Pull(ctx, api.PullRequest{Ref: refA, Wait: true}, nil); err != nil {
		t.Fatal(err)
	}

	pullDone := make(chan error, 1)
	go func() { pullDone <- w.client.Pull(ctx, api.PullRequest{Ref: refB, Wait: true}, nil) }()
	for len(regB.Requests()) == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	if have := regB.Requests()[0].Have; len(have) != 1 || have[0] != imgA.Layers[0].Digest {
		t.Fatalf("B's request Have = %v, want A's layer", have)
	}
	rmiDone := make(chan error, 1)
	go func() {
		_, err := w.client.RemoveImage(ctx, refA, "")
		rmiDone <- err
	}()
	// The collection waits for B's header; let the registry answer,
	// without the shared content (the worker said it has it).
	select {
	case err := <-rmiDone:
		t.Fatalf("rmi finished while a pull relied on A's layer: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	close(regB.HeaderGate)
	if err := <-pullDone; err != nil {
		t.Fatalf("pull of B: %v", err)
	}
	if err := <-rmiDone; err != nil {
		t.Fatalf("rmi: %v", err)
	}
	st, err := w.client.Image(ctx, refB, "")
	if err != nil || !st.Complete || st.DedupBytes == 0 {
		t.Fatalf("B after the collection: %+v, %v", st, err)
	}
	if !w.d.Store.Has(digest.FromBytes(shared)) {
		t.Fatal("the content B relied on was collected")
	}
	if w.d.Store.Has(digest.FromBytes([]byte("only in A\n"))) {
		t.Fatal("A's own content survived")
	}
}
