package schema

import (
	"context"
	"errors"
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
