package schema

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"
)

func TestAddTrace(t *testing.T) {
	ctx := context.Background()
	db := openTest(t)
	const repo, m = "library/app", "sha256:m1"
	if _, _, err := db.TraceTarget(ctx, repo, m); !errors.Is(err, ErrNotFound) {
		t.Fatalf("trace target of an unknown manifest: %v", err)
	}
	if err := db.PutLayer(ctx, testLayer("sha256:l1")); err != nil {
		t.Fatal(err)
	}
	if err := db.UpsertImage(ctx, Image{Repository: repo, Digest: "sha256:p1", MediaType: "m", State: "queued"}); err != nil {
		t.Fatal(err)
	}
	if err := db.CompleteImage(ctx, repo, "sha256:p1", m, "m", []ImageManifest{
		{Platform: "linux/amd64", OriginalDigest: "sha256:p1", ManifestDigest: m, ConfigDigest: "sha256:c", Layers: []string{"sha256:l1"}},
	}); err != nil {
		t.Fatal(err)
	}
	if p, _, err := db.TraceTarget(ctx, repo, m); err != nil || p != "linux/amd64" {
		t.Fatalf("trace target: %q %v", p, err)
	}

	// The merge sees every stored run, most recent first, and its result
	// replaces the manifest's priority.
	var seen [][]string
	merge := func(runs []TraceRun) []PriorityItem {
		var ids []string
		var out []PriorityItem
		for _, r := range runs {
			ids = append(ids, r.ID)
			for _, e := range r.Entries {
				out = append(out, PriorityItem{Layer: e.Layer, Name: e.Name, Digest: e.Digest, ChunkOffset: e.ChunkOffset, Runs: 1})
			}
		}
		seen = append(seen, ids)
		return out
	}
	tr := func(id string, names ...string) *Trace {
		tr := &Trace{ID: id, Repository: repo, ManifestDigest: m, Worker: "w", Container: id, StartedAt: time.Unix(1, 0)}
		for i, n := range names {
			tr.Entries = append(tr.Entries, TraceEntry{Layer: "sha256:l1", Name: n, Digest: "sha256:" + n, TimeNS: int64(i)})
		}
		return tr
	}
	clock := &fakeClock{t: time.Unix(1000, 0)}
	db.now = clock.now
	for _, step := range []struct {
		trace    *Trace
		existing bool
		want     []string // names of the priority after the step
	}{
		{tr("t1", "a", "b"), false, []string{"a", "b"}},
		{tr("t1", "a", "b"), true, []string{"a", "b"}},
		{tr("t2", "c"), false, []string{"c", "a", "b"}},
	} {
		clock.add(time.Second)
		existing, err := db.AddTrace(ctx, step.trace, merge)
		if err != nil || existing != step.existing {
			t.Fatalf("AddTrace %s: existing=%v err=%v", step.trace.ID, existing, err)
		}
		items, err := db.TracePriority(ctx, repo, m)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, it := range items {
			names = append(names, it.Name)
		}
		if len(names) != len(step.want) {
			t.Fatalf("after %s: priority %v, want %v", step.trace.ID, names, step.want)
		}
		for i := range names {
			if names[i] != step.want[i] {
				t.Fatalf("after %s: priority %v, want %v", step.trace.ID, names, step.want)
			}
		}
	}
	if len(seen) != 2 || len(seen[1]) != 2 || seen[1][0] != "t2" {
		t.Errorf("merge calls saw %v, want one call per new trace, most recent run first", seen)
	}
	if n, err := db.TraceCount(ctx, repo, m); err != nil || n != 2 {
		t.Errorf("%d traces (%v), want 2", n, err)
	}
	var traces, items int
	if err := db.queryRow(ctx, db.db, `SELECT traces, items FROM trace_manifests WHERE repository = ? AND manifest_digest = ?`,
		repo, m).Scan(&traces, &items); err != nil || traces != 2 || items != 3 {
		t.Errorf("trace_manifests: %d traces, %d items (%v)", traces, items, err)
	}
}

// TestPredictedTraces: a manifest's priority is its latest prediction
// while it has no real trace, and only its real traces' once it has one;
// a predicted priority is neither inherited nor shared.
func TestPredictedTraces(t *testing.T) {
	ctx := context.Background()
	db := openTest(t)
	clock := &fakeClock{t: time.Unix(1000, 0)}
	db.now = clock.now
	const repo = "library/app"
	if err := db.PutLayer(ctx, testLayer("sha256:l1")); err != nil {
		t.Fatal(err)
	}
	for _, im := range []struct{ pushed, converted string }{{"sha256:p1", "sha256:m1"}, {"sha256:p2", "sha256:m2"}} {
		clock.add(time.Second)
		if err := db.UpsertImage(ctx, Image{Repository: repo, Digest: im.pushed, MediaType: "m", State: "queued"}); err != nil {
			t.Fatal(err)
		}
		if err := db.CompleteImage(ctx, repo, im.pushed, im.converted, "m", []ImageManifest{{Platform: "linux/amd64",
			OriginalDigest: im.pushed, ManifestDigest: im.converted, ConfigDigest: "sha256:c", Layers: []string{"sha256:l1"}}}); err != nil {
			t.Fatal(err)
		}
	}
	// The merge names the runs it saw.
	var seen []string
	merge := func(runs []TraceRun) []PriorityItem {
		var out []PriorityItem
		for _, r := range runs {
			seen = append(seen, r.ID)
			out = append(out, PriorityItem{Layer: "sha256:l1", Name: r.ID, Digest: "sha256:" + r.ID, Runs: 1})
		}
		return out
	}
	add := func(id, m string, predicted bool) {
		t.Helper()
		clock.add(time.Second)
		seen = nil
		tr := &Trace{ID: id, Repository: repo, ManifestDigest: m, Predicted: predicted,
			Entries: []TraceEntry{{Layer: "sha256:l1", Name: "etc/passwd", Digest: "sha256:aaaa"}}}
		if _, err := db.AddTrace(ctx, tr, merge); err != nil {
			t.Fatal(err)
		}
	}
	names := func(get func(context.Context, string, string) ([]PriorityItem, error), m string) []string {
		t.Helper()
		items, err := get(ctx, repo, m)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, it := range items {
			out = append(out, it.Name)
		}
		return out
	}
	check := func(step, m string, real, predicted []string) {
		t.Helper()
		if got := names(db.TracePriority, m); !slices.Equal(got, real) {
			t.Errorf("%s: priority of real traces %v, want %v", step, got, real)
		}
		if got := names(db.PredictedPriority, m); !slices.Equal(got, predicted) {
			t.Errorf("%s: predicted priority %v, want %v", step, got, predicted)
		}
	}
	shared := func() int {
		n := 0
		if err := db.AllTracedChunks(ctx, func(TracedChunk) { n++ }); err != nil {
			t.Fatal(err)
		}
		return n
	}

	add("pred1", "sha256:m1", true)
	check("first prediction", "sha256:m1", nil, []string{"pred1"})
	add("pred2", "sha256:m1", true)
	check("second prediction", "sha256:m1", nil, []string{"pred2"})
	if !slices.Equal(seen, []string{"pred2"}) {
		t.Errorf("merge of predictions saw %v, want the latest alone", seen)
	}
	if prev, err := db.PreviousTracedManifest(ctx, repo, "sha256:m2"); err != nil || prev != "" {
		t.Errorf("m2 inherits %q (%v) from a prediction", prev, err)
	}
	if n := shared(); n != 0 {
		t.Errorf("%d predicted items shared with other manifests", n)
	}
	if tot, err := db.TraceTotals(ctx); err != nil || tot.Items != 1 || tot.Traces != 2 {
		t.Errorf("totals %+v (%v): predictions count in the generation", tot, err)
	}

	add("real1", "sha256:m1", false)
	check("first real trace", "sha256:m1", []string{"real1"}, nil)
	if !slices.Equal(seen, []string{"real1"}) {
		t.Errorf("merge with a real trace saw %v, want the real one alone", seen)
	}
	add("pred3", "sha256:m1", true)
	check("prediction after a real trace", "sha256:m1", []string{"real1"}, nil)
	if prev, err := db.PreviousTracedManifest(ctx, repo, "sha256:m2"); err != nil || prev != "sha256:m1" {
		t.Errorf("m2 inherits %q (%v), want m1 once it has a real trace", prev, err)
	}
	if n := shared(); n != 1 {
		t.Errorf("%d items shared, want m1's real one", n)
	}
	if n, err := db.TraceCount(ctx, repo, "sha256:m1"); err != nil || n != 4 {
		t.Errorf("%d traces stored (%v), want 4", n, err)
	}
}
