package schema

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/starlight-project/starlight/api"
)

// The reads of the delta planner are tested end to end in
// registry-ext/delta; these are the cases its fixtures do not reach.

func TestManifestTrees(t *testing.T) {
	ctx := context.Background()
	db := openTest(t)
	complete := func(pushed, converted string, layers ...string) {
		t.Helper()
		if err := db.UpsertImage(ctx, Image{Repository: "r", Digest: pushed, MediaType: "m", State: "queued"}); err != nil {
			t.Fatal(err)
		}
		if err := db.CompleteImage(ctx, "r", pushed, converted, "m", []ImageManifest{
			{Platform: "linux/amd64", OriginalDigest: pushed, ManifestDigest: converted, ConfigDigest: "sha256:cf", Layers: layers},
		}); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"sha256:l1", "sha256:l2"} {
		if err := db.PutLayer(ctx, testLayer(d)); err != nil {
			t.Fatal(err)
		}
	}
	complete("sha256:p1", "sha256:c1", "sha256:l2", "sha256:l1")
	complete("sha256:p0", "sha256:c0") // no layers
	complete("sha256:px", "sha256:cx", "sha256:l1", "sha256:missing")

	trees, err := db.ManifestTrees(ctx, "sha256:c1")
	if err != nil {
		t.Fatal(err)
	}
	if len(trees) != 2 || trees[0].Digest != "sha256:l2" || trees[1].Digest != "sha256:l1" {
		t.Fatalf("trees of %d layers, want l2 then l1: %+v", len(trees), trees)
	}
	want := testLayer("sha256:l2")
	if got := trees[0]; got.DiffID != want.DiffID || got.Size != want.Size || !reflect.DeepEqual(got.Entries, want.Entries) {
		t.Errorf("tree of l2 differs from what was stored")
	}
	if trees, err := db.ManifestTrees(ctx, "sha256:c0"); err != nil || len(trees) != 0 {
		t.Errorf("manifest without layers: %d trees, %v", len(trees), err)
	}
	if _, err := db.ManifestTrees(ctx, "sha256:unknown"); !errors.Is(err, ErrNotFound) {
		t.Errorf("unknown manifest: %v, want ErrNotFound", err)
	}
	if _, err := db.ManifestTrees(ctx, "sha256:cx"); err == nil || errors.Is(err, ErrNotFound) {
		t.Errorf("manifest with a layer not indexed: %v, want an error other than ErrNotFound", err)
	}
}

func TestContentsInLayers(t *testing.T) {
	ctx := context.Background()
	db := openTest(t)
	// More layers than one statement takes, each with its own content;
	// the content looked for sits in the last batch.
	n := 2*maxParams + 3
	var layers []string
	for i := range n {
		d := fmt.Sprintf("sha256:l%04d", i)
		c := fmt.Sprintf("sha256:c%04d", i)
		if err := db.PutLayer(ctx, &Layer{Digest: d, DiffID: d, TOCDigest: d, Entries: []api.Entry{
			{Name: "f", Type: api.TypeReg, Size: 1, Digest: c},
			{Name: "empty", Type: api.TypeReg},
		}}); err != nil {
			t.Fatal(err)
		}
		layers = append(layers, d)
	}
	for _, tc := range []struct {
		name     string
		layers   []string
		contents []string
		want     []string
	}{
		{"across batches", layers, []string{"sha256:c0000", fmt.Sprintf("sha256:c%04d", n-1), "sha256:none"},
			[]string{"sha256:c0000", fmt.Sprintf("sha256:c%04d", n-1)}},
		{"not in the layers asked", layers[:1], []string{"sha256:c0001"}, nil},
		{"unknown layer", []string{"sha256:unknown"}, []string{"sha256:c0000"}, nil},
		{"no layers", nil, []string{"sha256:c0000"}, nil},
		{"nothing looked for", layers, nil, nil},
		{"the empty digest is no content", layers[:1], []string{""}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			set := map[string]struct{}{}
			for _, c := range tc.contents {
				set[c] = struct{}{}
			}
			got, err := db.ContentsInLayers(ctx, tc.layers, set)
			if err != nil {
				t.Fatal(err)
			}
			if keys := slices.Sorted(maps.Keys(got)); !slices.Equal(keys, tc.want) {
				t.Errorf("found %v, want %v", keys, tc.want)
			}
		})
	}
}

func TestOriginalManifests(t *testing.T) {
	ctx := context.Background()
	db := openTest(t)
	for _, p := range []struct{ repo, pushed, converted string }{
		{"r", "sha256:p2", "sha256:c"},
		{"r", "sha256:p1", "sha256:c"},
		{"r", "sha256:c", "sha256:c"}, // pushed already converted
		{"other", "sha256:p3", "sha256:c"},
	} {
		if err := db.UpsertImage(ctx, Image{Repository: p.repo, Digest: p.pushed, MediaType: "m", State: "queued"}); err != nil {
			t.Fatal(err)
		}
		if err := db.CompleteImage(ctx, p.repo, p.pushed, p.converted, "m", []ImageManifest{
			{Platform: "linux/amd64", OriginalDigest: p.pushed, ManifestDigest: p.converted, ConfigDigest: "sha256:cf"},
		}); err != nil {
			t.Fatal(err)
		}
	}
	got, err := db.OriginalManifests(ctx, "r", "sha256:c")
	if err != nil || !slices.Equal(got, []string{"sha256:p1", "sha256:p2"}) {
		t.Errorf("originals %v, %v; want p1, p2", got, err)
	}
}

func TestTraceReads(t *testing.T) {
	ctx := context.Background()
	db := openTest(t)
	clock := &fakeClock{t: time.Unix(1000, 0)}
	db.now = clock.now
	// m1 and m2 are two versions of r (m2 pushed later), over layers
	// holding "sha256:aaaa" and "sha256:bb" (450 files) and "sha256:zz";
	// m3 is of another platform.
	if err := db.PutLayer(ctx, testLayer("sha256:l1")); err != nil {
		t.Fatal(err)
	}
	if err := db.PutLayer(ctx, &Layer{Digest: "sha256:l2", DiffID: "sha256:d2", TOCDigest: "sha256:t2",
		Entries: []api.Entry{{Name: "z", Type: api.TypeReg, Size: 1, Digest: "sha256:zz"}}}); err != nil {
		t.Fatal(err)
	}
	for _, im := range []struct{ pushed, converted, platform, layer string }{
		{"sha256:p1", "sha256:m1", "linux/amd64", "sha256:l1"},
		{"sha256:p2", "sha256:m2", "linux/amd64", "sha256:l2"},
		{"sha256:p3", "sha256:m3", "linux/arm64", "sha256:l2"},
	} {
		clock.add(time.Second)
		if err := db.UpsertImage(ctx, Image{Repository: "r", Digest: im.pushed, MediaType: "m", State: "queued"}); err != nil {
			t.Fatal(err)
		}
		if err := db.CompleteImage(ctx, "r", im.pushed, im.converted, "m", []ImageManifest{{Platform: im.platform,
			OriginalDigest: im.pushed, ManifestDigest: im.converted, ConfigDigest: "sha256:cf", Layers: []string{im.layer}}}); err != nil {
			t.Fatal(err)
		}
	}
	if tot, err := db.TraceTotals(ctx); err != nil || tot != (TraceTotals{}) {
		t.Errorf("totals without traces: %+v, %v", tot, err)
	}
	if prev, err := db.PreviousTracedManifest(ctx, "r", "sha256:m2"); err != nil || prev != "" {
		t.Errorf("previous traced version without traces: %q, %v", prev, err)
	}
	trace := func(m string, items ...PriorityItem) {
		t.Helper()
		clock.add(time.Second)
		if _, err := db.AddTrace(ctx, &Trace{ID: "trace of " + m, Repository: "r", ManifestDigest: m},
			func([]TraceRun) []PriorityItem { return items }); err != nil {
			t.Fatal(err)
		}
	}
	trace("sha256:m1", PriorityItem{Digest: "sha256:aaaa", Whole: true}, PriorityItem{Digest: "sha256:bb", ChunkOffset: 1})
	trace("sha256:m3", PriorityItem{Digest: "sha256:zz"}, PriorityItem{Digest: "sha256:aaaa"}, PriorityItem{Digest: "sha256:other"})

	if tot, err := db.TraceTotals(ctx); err != nil || tot != (TraceTotals{Manifests: 2, Traces: 2, Items: 5}) {
		t.Errorf("totals %+v, %v", tot, err)
	}
	// m3 is traced but of another platform.
	if prev, err := db.PreviousTracedManifest(ctx, "r", "sha256:m2"); err != nil || prev != "sha256:m1" {
		t.Errorf("previous traced version of m2: %q, %v; want m1", prev, err)
	}
	collect := func(each func(fn func(TracedChunk)) error) []TracedChunk {
		t.Helper()
		var out []TracedChunk
		if err := each(func(c TracedChunk) { out = append(out, c) }); err != nil {
			t.Fatal(err)
		}
		slices.SortFunc(out, func(a, b TracedChunk) int {
			return cmp.Or(cmp.Compare(a.Items, b.Items), cmp.Compare(a.Position, b.Position))
		})
		return out
	}
	all := []TracedChunk{
		{Digest: "sha256:aaaa", Whole: true, Position: 0, Items: 2},
		{Digest: "sha256:bb", ChunkOffset: 1, Position: 1, Items: 2},
		{Digest: "sha256:zz", Position: 0, Items: 3},
		{Digest: "sha256:aaaa", Position: 1, Items: 3},
		{Digest: "sha256:other", Position: 2, Items: 3},
	}
	if got := collect(func(fn func(TracedChunk)) error { return db.AllTracedChunks(ctx, fn) }); !slices.Equal(got, all) {
		t.Errorf("all traced chunks\n got %+v\nwant %+v", got, all)
	}
	// Those m1's layer holds, each once however many files hold it.
	if got := collect(func(fn func(TracedChunk)) error { return db.TracedChunksOf(ctx, "sha256:m1", fn) }); !slices.Equal(got, []TracedChunk{all[0], all[1], all[3]}) {
		t.Errorf("traced chunks of m1's contents\n got %+v\nwant %+v", got, []TracedChunk{all[0], all[1], all[3]})
	}
}
