package delta

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

// titem is one row of a merged priority for the fixture: "name" or
// "name@offset" of layer l, whole when traced by a whole-file run.
type titem struct {
	l     *tlayer
	name  string
	off   int64
	whole bool
}

// trace stores a merged priority for manifest m of repository, as the
// registry materialises it after a merge.
func (f *fixture) trace(repository string, m digest.Digest, pushedAt int64, items ...titem) {
	t := f.t
	t.Helper()
	if _, err := f.raw.Exec(`INSERT INTO trace_manifests (repository, manifest_digest, platform, pushed_at, traces, items, updated_at)
		VALUES (?, ?, 'linux/amd64', ?, 1, ?, ?)`, repository, m.String(), pushedAt, len(items), pushedAt); err != nil {
		t.Fatal(err)
	}
	for i, it := range items {
		d := ""
		for _, e := range it.l.entries {
			if e.Name == it.name {
				d = e.Digest
			}
		}
		if d == "" {
			t.Fatalf("no content %s in layer", it.name)
		}
		whole := 0
		if it.whole {
			whole = 1
		}
		if _, err := f.raw.Exec(`INSERT INTO trace_priority (repository, manifest_digest, position, layer_digest, name,
			chunk_offset, digest, whole, runs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)`,
			repository, m.String(), i, it.l.digest.String(), it.name, it.off, d, whole); err != nil {
			t.Fatal(err)
		}
	}
}

// predicted stores a predicted priority for manifest m of repository, as
// the registry keeps the prediction of an image without real traces.
func (f *fixture) predicted(repository string, m digest.Digest, pushedAt int64, items ...titem) {
	f.t.Helper()
	f.trace(repository, m, pushedAt, items...)
	if _, err := f.raw.Exec(`UPDATE trace_manifests SET predicted = 1 WHERE repository = ? AND manifest_digest = ?`,
		repository, m.String()); err != nil {
		f.t.Fatal(err)
	}
}

// frameNames names the frames of h as "path@offset" by the first entry
// holding each content, leaving out estargz's landmark file.
func frameNames(h *api.BundleHeader) []string {
	byDigest := map[string]string{}
	for _, l := range h.Layers {
		for _, e := range l.Entries {
			if _, ok := byDigest[e.Digest]; !ok && e.Digest != "" {
				byDigest[e.Digest] = e.Name
			}
		}
	}
	var out []string
	for _, fr := range h.Frames {
		if name := byDigest[fr.Digest]; !strings.HasPrefix(name, ".no.prefetch") { // estargz's landmark
			out = append(out, fmt.Sprintf("%s@%d", name, fr.Offset))
		}
	}
	return out
}

func plan(t *testing.T, p *Planner, repo string, m digest.Digest) []string {
	t.Helper()
	h, _, err := p.Plan(context.Background(), repo, m, api.DeltaRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return frameNames(h)
}

// tracedScene is one image of one layer: a three-chunk file "big" and
// small files a..e, in TOC order big, a, b, c, d, e.
type tracedScene struct {
	f *fixture
	l *tlayer
	m digest.Digest
}

func newTracedScene(t *testing.T) *tracedScene {
	f := newFixture(t)
	l := f.layer(
		dir("app"),
		reg("app/big", data(1, 3*testChunkSize)),
		reg("app/a", data(2, 100)),
		reg("app/b", data(3, 100)),
		reg("app/c", data(4, 100)),
		reg("app/d", data(5, 100)),
		reg("app/e", data(6, 100)),
	)
	return &tracedScene{f: f, l: l, m: f.image("app", l)}
}

func (s *tracedScene) planner() *Planner {
	return s.f.planner().WithPriority(NewTraced(s.f.db))
}

func TestTracedRanking(t *testing.T) {
	const c1, c2 = testChunkSize, 2 * testChunkSize
	untraced := []string{"app/big@0", fmt.Sprintf("app/big@%d", c1), fmt.Sprintf("app/big@%d", c2),
		"app/a@0", "app/b@0", "app/c@0", "app/d@0", "app/e@0"}
	for _, tc := range []struct {
		name  string
		items func(s *tracedScene) []titem
		want  []string
	}{
		{
			name:  "no traces: layer and TOC order",
			items: func(*tracedScene) []titem { return nil },
			want:  untraced,
		},
		{
			name: "whole files travel at their rank",
			items: func(s *tracedScene) []titem {
				return []titem{{s.l, "app/d", 0, true}, {s.l, "app/big", 0, true}, {s.l, "app/b", 0, true}}
			},
			want: []string{"app/d@0", "app/big@0", fmt.Sprintf("app/big@%d", c1), fmt.Sprintf("app/big@%d", c2),
				"app/b@0", "app/a@0", "app/c@0", "app/e@0"},
		},
		{
			name: "traced chunks first, the rest of their file after every traced item",
			items: func(s *tracedScene) []titem {
				return []titem{{s.l, "app/d", 0, false}, {s.l, "app/big", c2, false}, {s.l, "app/b", 0, false}}
			},
			want: []string{"app/d@0", fmt.Sprintf("app/big@%d", c2), "app/b@0",
				"app/big@0", fmt.Sprintf("app/big@%d", c1), "app/a@0", "app/c@0", "app/e@0"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newTracedScene(t)
			if items := tc.items(s); items != nil {
				s.f.trace("app", s.m, 1, items...)
			}
			got := plan(t, s.planner(), "app", s.m)
			if !slices.Equal(got, tc.want) {
				t.Errorf("frames\n got %v\nwant %v", got, tc.want)
			}
			// Deterministic: the same request plans the same frames.
			if again := plan(t, s.planner(), "app", s.m); !slices.Equal(again, got) {
				t.Errorf("second plan differs:\n%v\n%v", again, got)
			}
		})
	}
}

func TestTracedSharedContents(t *testing.T) {
	s := newTracedScene(t)
	// Another repository's image holds app/c and app/e (same contents,
	// other names) and traced them, e before c.
	other := s.f.layer(
		reg("lib/e-copy", data(6, 100)),
		reg("lib/c-copy", data(4, 100)),
		reg("lib/own", data(7, 100)),
	)
	om := s.f.image("base", other)
	s.f.trace("base", om, 1, titem{other, "lib/own", 0, true}, titem{other, "lib/e-copy", 0, true},
		titem{other, "lib/c-copy", 0, true})
	// This image traced only d.
	s.f.trace("app", s.m, 2, titem{s.l, "app/d", 0, true})

	got := plan(t, s.planner(), "app", s.m)
	want := []string{"app/d@0", "app/e@0", "app/c@0",
		"app/big@0", fmt.Sprintf("app/big@%d", testChunkSize), fmt.Sprintf("app/big@%d", 2*testChunkSize),
		"app/a@0", "app/b@0"}
	if !slices.Equal(got, want) {
		t.Errorf("frames\n got %v\nwant %v", got, want)
	}
}

func TestTracedInheritsPreviousVersion(t *testing.T) {
	f := newFixture(t)
	v1 := f.layer(
		reg("app/main", data(10, 100)),
		reg("app/conf", data(11, 100)),
		reg("app/lib-1.0.so", data(12, 100)),
		reg("app/data", data(13, 100)),
		reg("app/old", data(14, 100)),
	)
	m1 := f.image("app", v1)
	// v2: main and conf changed, the library was renamed with the same
	// content, data is unchanged, old is gone, new is new. Every layer
	// digest differs.
	v2 := f.layer(
		reg("app/new", data(20, 100)),
		reg("app/data", data(13, 100)),
		reg("app/lib-1.1.so", data(12, 100)),
		reg("app/conf", data(21, 100)),
		reg("app/main", data(22, 100)),
	)
	m2 := f.image("app", v2)
	// An older version, traced too, is not the one inherited.
	v0 := f.layer(reg("app/data", data(30, 100)), reg("app/new", data(31, 100)))
	m0 := f.image("app", v0)
	f.trace("app", m0, 1, titem{v0, "app/new", 0, true}, titem{v0, "app/data", 0, true})
	f.trace("app", m1, 2, titem{v1, "app/main", 0, true}, titem{v1, "app/lib-1.0.so", 0, true},
		titem{v1, "app/conf", 0, true}, titem{v1, "app/old", 0, true})
	// Another repository's traces are never inherited by path, but the
	// contents it traced are shared.
	ol := f.layer(reg("x/new", data(20, 100)), reg("app/data", data(40, 100)))
	f.trace("other", f.image("other", ol), 3, titem{ol, "x/new", 0, true}, titem{ol, "app/data", 0, true})

	p := f.planner().WithPriority(NewTraced(f.db))
	got := plan(t, p, "app", m2)
	// main by path, lib by content, conf by path; then app/new is traced
	// by another manifest (shared content); data follows in TOC order.
	want := []string{"app/main@0", "app/lib-1.1.so@0", "app/conf@0", "app/new@0", "app/data@0"}
	if !slices.Equal(got, want) {
		t.Errorf("frames\n got %v\nwant %v", got, want)
	}
}

// TestTracedPrediction: a prediction orders an image nobody has run,
// above other images' traces of its contents; an image whose previous
// version was traced takes that order first, then its prediction; the
// prediction is shared with no other manifest.
func TestTracedPrediction(t *testing.T) {
	s := newTracedScene(t)
	other := s.f.layer(reg("lib/e-copy", data(6, 100)), reg("lib/c-copy", data(4, 100)))
	om := s.f.image("base", other)
	s.f.trace("base", om, 1, titem{other, "lib/e-copy", 0, true}, titem{other, "lib/c-copy", 0, true})
	s.f.predicted("app", s.m, 2, titem{s.l, "app/b", 0, true}, titem{s.l, "app/big", 0, true})

	big := []string{"app/big@0", fmt.Sprintf("app/big@%d", testChunkSize), fmt.Sprintf("app/big@%d", 2*testChunkSize)}
	got := plan(t, s.planner(), "app", s.m)
	want := append(append([]string{"app/b@0"}, big...), "app/e@0", "app/c@0", "app/a@0", "app/d@0")
	if !slices.Equal(got, want) {
		t.Errorf("predicted frames\n got %v\nwant %v", got, want)
	}
	// Another image holding b and big does not take app's prediction.
	l2 := s.f.layer(reg("x/a", data(2, 100)), reg("x/b", data(3, 100)), reg("x/big", data(1, 3*testChunkSize)))
	if got := plan(t, s.planner(), "x", s.f.image("x", l2)); !slices.Equal(got[:2], []string{"x/a@0", "x/b@0"}) {
		t.Errorf("another image ordered by app's prediction: %v", got)
	}

	// v2 of app: the traced v1 by path first, then v2's own prediction.
	v2 := s.f.layer(reg("app/c", data(4, 100)), reg("app/d", data(5, 100)), reg("app/new", data(8, 100)), reg("app/a", data(2, 100)))
	m2 := s.f.image("app", v2)
	// v1 has been run since: its real trace replaces its prediction.
	for _, table := range []string{"trace_manifests", "trace_priority"} {
		if _, err := s.f.raw.Exec(`DELETE FROM ` + table + ` WHERE repository = 'app'`); err != nil {
			t.Fatal(err)
		}
	}
	s.f.trace("app", s.m, 2, titem{s.l, "app/d", 0, true})
	s.f.predicted("app", m2, 3, titem{v2, "app/new", 0, true}, titem{v2, "app/d", 0, true})
	got = plan(t, s.planner(), "app", m2)
	want = []string{"app/d@0", "app/new@0", "app/c@0", "app/a@0"}
	if !slices.Equal(got, want) {
		t.Errorf("v2 frames\n got %v\nwant %v", got, want)
	}
}

func TestVisiblePaths(t *testing.T) {
	layers := []api.LayerTree{
		{Entries: []api.Entry{
			{Name: "a", Type: api.TypeReg, Digest: "sha256:a0"},
			{Name: "b", Type: api.TypeReg, Digest: "sha256:b0"},
			{Name: "d/x", Type: api.TypeReg, Digest: "sha256:x0"},
		}},
		{Entries: []api.Entry{
			{Name: "a", Type: api.TypeReg, Digest: "sha256:a1"},
			{Name: ".wh.b", Type: api.TypeReg},
			{Name: "d/.wh.x", Type: api.TypeReg},
			{Name: "h", Type: api.TypeHardlink, LinkName: "a"},
		}},
	}
	got := visiblePaths(layers)
	want := map[string]string{"a": "sha256:a1", "b": "", "d/x": "", "h": "sha256:a1"}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %q, want %q", k, got[k], v)
		}
	}
}

// TestTracedOverhead measures what the trace-based Priority adds to a
// plan of an image of 10k files, each with one chunk: with no trace at
// all in the registry, with a trace of 2,000 of the files, and inherited
// from a previous version (matched by path). It only runs when
// STARLIGHT_BENCH is set, and asserts nothing.
// BenchmarkTracedOverhead measures what ranking by traces adds to planning
// an image of 10k files: go test -run ^$ -bench TracedOverhead ./registry-ext/delta
func BenchmarkTracedOverhead(b *testing.B) {
	var t testing.TB = b
	const files, traced = 10_000, 2_000
	f := newFixture(t)
	mk := func(name string, salt int) (*tlayer, digest.Digest) {
		l := &tlayer{digest: digest.FromString(name), diffID: digest.FromString(name + "diff"), size: files * 100}
		for i := range files {
			// Half of the files change between versions.
			d := digest.FromString(fmt.Sprint(i, "/", salt*(i%2))).String()
			l.entries = append(l.entries, oneChunkFile(fmt.Sprintf("usr/lib/f%05d", i), d, int64(i)*100))
		}
		f.index(l, l.digest)
		return l, f.image("bench", l)
	}
	l1, m1 := mk("v1", 1)
	ctx := context.Background()
	measure := func(name string, m digest.Digest, pr Priority) {
		p := f.planner()
		if pr != nil {
			p = p.WithPriority(pr)
		}
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := p.Plan(ctx, "bench", m, api.DeltaRequest{}); err != nil {
					b.Fatal(err)
				}
			}
		})
		if pr == nil {
			return
		}
		// The Priority alone, on the candidates of the same plan.
		h, _, err := f.planner().Plan(ctx, "bench", m, api.DeltaRequest{})
		if err != nil {
			t.Fatal(err)
		}
		var st api.BundleStats
		base := candidates(h.Layers, nil, &st)
		cands := make([]Candidate, len(base))
		b.Run(name+"/rank-only", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				copy(cands, base)
				if err := pr.Rank(ctx, "bench", m, h.Layers, cands); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	measure("default-order", m1, nil)
	measure("no-traces-in-registry", m1, NewTraced(f.db))
	var items []titem
	for i := files - 1; len(items) < traced; i -= files / traced {
		items = append(items, titem{l1, l1.entries[i].Name, 0, false})
	}
	f.trace("bench", m1, 1, items...)
	measure("own-trace-2k-items", m1, NewTraced(f.db))
	_, m2 := mk("v2", 2)
	measure("inherited-trace", m2, NewTraced(f.db))
}
