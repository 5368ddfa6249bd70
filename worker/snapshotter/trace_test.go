//go:build linux

package snapshotter

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/opencontainers/go-digest"
)

// fakeTracer traces snapshots labelled "trace", giving each a private copy
// directory per layer.
type fakeTracer struct {
	root string
	mu   sync.Mutex
	log  []string
}

func (f *fakeTracer) Trace(_ context.Context, key string, labels map[string]string, layers []digest.Digest) bool {
	f.record("trace " + key + " " + strings.Join(shortDigests(layers), ","))
	return labels["trace"] == "yes"
}

func (f *fakeTracer) TracedDirs(_ context.Context, key string, _ map[string]string, layers []digest.Digest) ([]string, error) {
	f.record("dirs " + key)
	var dirs []string
	for _, l := range layers {
		dir := filepath.Join(f.root, key, l.Encoded()[:8])
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}
		os.WriteFile(filepath.Join(dir, "private"), []byte(l.Encoded()[:8]), 0o644)
		dirs = append(dirs, dir)
	}
	return dirs, nil
}

func (f *fakeTracer) Untrace(_ context.Context, key string) { f.record("untrace " + key) }

func (f *fakeTracer) record(s string) {
	f.mu.Lock()
	f.log = append(f.log, s)
	f.mu.Unlock()
}

func (f *fakeTracer) calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.log...)
}

func shortDigests(ds []digest.Digest) []string {
	var out []string
	for _, d := range ds {
		out = append(out, d.Encoded()[:8])
	}
	return out
}

func TestTracedSnapshotsGetPrivateViews(t *testing.T) {
	requireRoot(t)
	root := t.TempDir()
	layers := &fakeLayers{dirs: map[digest.Digest]string{}, sizes: map[digest.Digest]int64{}}
	tr := &fakeTracer{root: filepath.Join(root, "private")}
	sn, err := New(filepath.Join(root, "snapshotter"), layers, WithTracer(tr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sn.Close() })
	e := &remoteEnv{ctx: namespaces.WithNamespace(context.Background(), "test"), sn: sn, layers: layers, root: root}
	d1 := e.addLayer(t, "l1", file("a", "1"))
	d2 := e.addLayer(t, "l2", file("b", "2"))
	e.prepareRemote(t, "chain1", "", d1)
	e.prepareRemote(t, "chain2", "chain1", d2)
	short := func(d digest.Digest) string { return d.Encoded()[:8] }

	// A snapshot the tracer declines stacks the shared views; the one it
	// takes stacks its private ones, at Prepare and at Mounts.
	plain, err := sn.Prepare(e.ctx, "plain", "chain2", snapshots.WithLabels(map[string]string{"trace": "no"}))
	must(t, err)
	if got, want := optionValue(plain[0], "lowerdir"), layers.dirs[d2]+":"+layers.dirs[d1]; got != want {
		t.Fatalf("untraced lowerdir %s, want %s", got, want)
	}
	ms, err := sn.Prepare(e.ctx, "traced", "chain2", snapshots.WithLabels(map[string]string{
		"trace": "yes", LabelTraced: "forged", LabelLayerDigest: d1.String(),
	}))
	must(t, err)
	want := filepath.Join(tr.root, "traced", short(d2)) + ":" + filepath.Join(tr.root, "traced", short(d1))
	if got := optionValue(ms[0], "lowerdir"); got != want {
		t.Fatalf("traced lowerdir %s, want %s", got, want)
	}
	info, err := sn.Stat(e.ctx, "traced")
	must(t, err)
	if info.Labels[LabelTraced] != "true" || info.Labels[LabelLayerDigest] != "" {
		t.Fatalf("traced snapshot labels %v", info.Labels)
	}
	// Callers cannot untrace it.
	info.Labels = map[string]string{"trace": "yes"}
	_, err = sn.Update(e.ctx, info, "labels."+LabelTraced, "labels.trace")
	must(t, err)
	ms2, err := sn.Mounts(e.ctx, "traced")
	must(t, err)
	if !reflect.DeepEqual(ms, ms2) {
		t.Fatalf("Mounts %+v, Prepare gave %+v", ms2, ms)
	}
	target := e.mountAt(t, ms2)
	if got := readFile(t, filepath.Join(target, "private")); got != short(d2) {
		t.Fatalf("the rootfs reads %q from the private views", got)
	}

	must(t, sn.Remove(e.ctx, "plain"))
	must(t, sn.Remove(e.ctx, "traced"))
	wantCalls := []string{
		"trace plain " + short(d2) + "," + short(d1),
		"trace traced " + short(d2) + "," + short(d1),
		"dirs traced", "dirs traced",
		"untrace traced",
	}
	if got := tr.calls(); !reflect.DeepEqual(got, wantCalls) {
		t.Fatalf("tracer calls\n got %q\nwant %q", got, wantCalls)
	}
}
