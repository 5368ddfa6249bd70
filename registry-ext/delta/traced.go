package delta

import (
	"context"
	"fmt"
	"path"
	"slices"
	"strings"
	"sync"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/schema"
)

// TraceIndex is the part of the index database Traced reads: the merged
// priorities (tables trace_manifests and trace_priority). *schema.DB
// implements it; tests use an in-memory fake.
type TraceIndex interface {
	// TraceTotals counts the merged priorities; traces are only ever
	// added, so the counts change with every merge.
	TraceTotals(ctx context.Context) (schema.TraceTotals, error)
	// TracePriority returns the merged priority of a manifest's real
	// traces, first item first; empty when it has none.
	TracePriority(ctx context.Context, repository, manifestDigest string) ([]schema.PriorityItem, error)
	// PredictedPriority returns the priority the registry predicted for a
	// manifest at conversion, while it has no real trace; empty otherwise.
	PredictedPriority(ctx context.Context, repository, manifestDigest string) ([]schema.PriorityItem, error)
	// PreviousTracedManifest returns the manifest of repository with real
	// traces and the platform of manifestDigest whose image was pushed
	// last, or "" when there is none.
	PreviousTracedManifest(ctx context.Context, repository, manifestDigest string) (string, error)
	// AllTracedChunks calls fn with every item of every merged priority
	// of real traces.
	AllTracedChunks(ctx context.Context, fn func(schema.TracedChunk)) error
	// TracedChunksOf calls fn with the items of every merged priority of
	// real traces whose content some layer of manifestDigest holds.
	TracedChunksOf(ctx context.Context, manifestDigest string, fn func(schema.TracedChunk)) error
}

// Traced is the Priority that orders a bundle by the merged startup
// traces the registry keeps in the index (tables trace_priority and
// trace_manifests; the merge and the policy are in docs/TRACES.md):
//
//  1. the chunks the manifest's own merged priority names, in its order;
//     a manifest without traces of its own uses the priority of the most
//     recently pushed traced manifest of the same repository and platform,
//     matched by path (then by content digest), followed by its own
//     predicted priority (the files the registry predicted at conversion
//     that a container reads first, package predict);
//  2. contents that are not in that priority but that other traced
//     manifests (any repository) name, by how early those needed them;
//  3. the untraced chunks of contents traced chunk by chunk, in the order
//     of their contents' first traced chunk;
//  4. everything else, in layer and TOC order.
//
// A content traced by a run that only recorded whole-file opens travels
// whole at its position. Traced reads the index with a handful of indexed
// queries per request; a registry without any traces costs one.
type Traced struct {
	index TraceIndex

	mu       sync.Mutex
	cache    map[string][]sharedItem // see sharedItems
	cacheGen generation
}

// NewTraced returns the trace-based Priority over index.
func NewTraced(index TraceIndex) *Traced {
	return &Traced{index: index}
}

// Generation implements Generational: the totals of the merged
// priorities, which change with every merge.
func (t *Traced) Generation(ctx context.Context) (string, error) {
	gen, err := t.index.TraceTotals(ctx)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%d/%d/%d", gen.Manifests, gen.Traces, gen.Items), nil
}

// Rank implements Priority.
func (t *Traced) Rank(ctx context.Context, repository string, manifest digest.Digest, layers []api.LayerTree, cands []Candidate) error {
	if len(cands) == 0 {
		return nil
	}
	gen, err := t.index.TraceTotals(ctx)
	if err != nil {
		return err
	}
	if gen.Items == 0 {
		return nil // no traces at all: keep the default order
	}

	r := newRanker(cands)
	items, err := t.index.TracePriority(ctx, repository, manifest.String())
	if err != nil {
		return err
	}
	if len(items) > 0 {
		for _, it := range items {
			r.add(it.Digest, it.ChunkOffset, it.Whole)
		}
	} else {
		prev, err := t.index.PreviousTracedManifest(ctx, repository, manifest.String())
		if err != nil {
			return err
		}
		if prev != "" {
			if items, err = t.index.TracePriority(ctx, repository, prev); err != nil {
				return err
			}
			paths := visiblePaths(layers)
			for _, it := range items {
				d, ok := paths[it.Name]
				if !ok {
					d = it.Digest // renamed or moved: the same content may still be there
				}
				r.add(d, it.ChunkOffset, it.Whole)
			}
		}
		// The prediction ranks below every real trace of the image (its
		// own, then its previous version's) and above other images'.
		predicted, err := t.index.PredictedPriority(ctx, repository, manifest.String())
		if err != nil {
			return err
		}
		for _, it := range predicted {
			r.add(it.Digest, it.ChunkOffset, it.Whole)
		}
	}
	if err := t.shared(ctx, gen, manifest.String(), r); err != nil {
		return err
	}
	r.apply()
	return nil
}

// sharedItem is a content chunk traced by another manifest, at position
// pos of that manifest's n items.
type sharedItem struct {
	digest string
	offset int64
	pos, n int64
	whole  bool
}

// shared ranks, after everything ranked so far, the candidate contents
// that other traced manifests name: each chunk by the earliest relative
// position (pos/n) at which any traced manifest needs it.
func (t *Traced) shared(ctx context.Context, gen generation, manifest string, r *ranker) error {
	need := 0
	for d := range r.chunks {
		if _, ok := r.first[d]; !ok {
			need++
		}
	}
	if need == 0 {
		return nil
	}
	byDigest, err := t.sharedItems(ctx, gen, manifest)
	if err != nil {
		return err
	}
	var items []sharedItem
	for d := range r.chunks {
		if _, ranked := r.first[d]; !ranked {
			items = append(items, byDigest[d]...)
		}
	}
	sortShared(items)
	for _, it := range items {
		r.add(it.digest, it.offset, it.whole)
	}
	return nil
}

// generation identifies a state of the merged priorities: traces are
// only ever added, so the number of traced manifests and of traces
// changes with every merge.
type generation = schema.TraceTotals

// sharedItems returns, by content digest, the best position of every
// traced chunk of any manifest. It is kept in memory between requests
// while the generation stays the same, unless the priorities are too
// large to keep (maxSharedCache rows): then only the contents of manifest
// are read, with a join.
func (t *Traced) sharedItems(ctx context.Context, gen generation, manifest string) (map[string][]sharedItem, error) {
	if gen.Items > maxSharedCache {
		return loadShared(func(fn func(schema.TracedChunk)) error {
			return t.index.TracedChunksOf(ctx, manifest, fn)
		})
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.cache != nil && t.cacheGen == gen {
		return t.cache, nil
	}
	m, err := loadShared(func(fn func(schema.TracedChunk)) error {
		return t.index.AllTracedChunks(ctx, fn)
	})
	if err != nil {
		return nil, err
	}
	t.cache, t.cacheGen = m, gen
	return m, nil
}

// maxSharedCache bounds the merged priority rows Traced keeps in memory
// (about 100 bytes each).
const maxSharedCache = 500_000

// loadShared folds the traced chunks each passes to its callback into
// the best position of every chunk, by content digest.
func loadShared(each func(fn func(schema.TracedChunk)) error) (map[string][]sharedItem, error) {
	out := map[string][]sharedItem{}
	err := each(func(c schema.TracedChunk) {
		it := sharedItem{digest: c.Digest, offset: c.ChunkOffset, pos: c.Position, n: c.Items, whole: c.Whole}
		if it.n <= 0 || it.pos < 0 || it.pos >= it.n {
			return // inconsistent row; never trust it for arithmetic
		}
		list := out[it.digest]
		i := slices.IndexFunc(list, func(b sharedItem) bool { return b.offset == it.offset })
		if i < 0 {
			out[it.digest] = append(list, it)
			return
		}
		b := &list[i]
		if it.pos*b.n < b.pos*it.n {
			b.pos, b.n = it.pos, it.n
		}
		b.whole = b.whole || it.whole
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// sortShared orders shared items by relative position, then content and
// offset, a total order.
func sortShared(items []sharedItem) {
	slices.SortFunc(items, func(a, b sharedItem) int {
		// a.pos/a.n against b.pos/b.n without fractions.
		if x, y := a.pos*b.n, b.pos*a.n; x != y {
			if x < y {
				return -1
			}
			return 1
		}
		if c := strings.Compare(a.digest, b.digest); c != 0 {
			return c
		}
		switch {
		case a.offset < b.offset:
			return -1
		case a.offset > b.offset:
			return 1
		}
		return 0
	})
}

// visiblePaths maps every path of the merged image to the content a
// container sees there ("" for a path without content): the topmost entry
// of that name, through hard links, unless a whiteout above removed it.
func visiblePaths(layers []api.LayerTree) map[string]string {
	paths := map[string]string{}
	for li := len(layers) - 1; li >= 0; li-- {
		entries := layers[li].Entries
		local := make(map[string]string, len(entries))
		var hidden []string
		for i := range entries {
			e := &entries[i]
			dir, base := path.Split(e.Name)
			if strings.HasPrefix(base, api.WhiteoutPrefix) {
				if base != api.WhiteoutOpaque {
					hidden = append(hidden, dir+strings.TrimPrefix(base, api.WhiteoutPrefix))
				}
				continue
			}
			d := e.Digest
			if e.Type == api.TypeHardlink {
				d = local[e.LinkName]
			}
			local[e.Name] = d
			if _, above := paths[e.Name]; !above {
				paths[e.Name] = d
			}
		}
		// A whiteout hides the layers below it, not its own.
		for _, p := range hidden {
			if _, above := paths[p]; !above {
				paths[p] = ""
			}
		}
	}
	return paths
}

// ranker assigns positions to candidate chunks as traced items are added,
// then turns them into ranks.
type ranker struct {
	cands  []Candidate
	chunks map[string][]int // content → candidate indices, ascending offset
	pos    []int            // per candidate: position of its first traced item, or -1
	first  map[string]int   // content → position of its first traced item
	whole  map[string]bool  // content traced by a whole-file run
	n      int              // positions handed out
}

func newRanker(cands []Candidate) *ranker {
	r := &ranker{
		cands:  cands,
		chunks: make(map[string][]int),
		pos:    make([]int, len(cands)),
		first:  make(map[string]int),
		whole:  make(map[string]bool),
	}
	for i := range cands {
		r.pos[i] = -1
		d := cands[i].Frame.Digest
		r.chunks[d] = append(r.chunks[d], i)
	}
	for _, idx := range r.chunks {
		slices.SortFunc(idx, func(a, b int) int {
			return int(min(max(cands[a].Frame.Offset-cands[b].Frame.Offset, -1), 1))
		})
	}
	return r
}

// add gives the next position to the candidate chunk of content d that
// holds offset off (chunk boundaries may differ between layers holding the
// same content). Items matching no candidate (contents the worker holds)
// still take a position; positions only need to be ordered.
func (r *ranker) add(d string, off int64, whole bool) {
	p := r.n
	r.n++
	idx := r.chunks[d]
	j, _ := slices.BinarySearchFunc(idx, off, func(i int, off int64) int {
		f := &r.cands[i].Frame
		switch {
		case f.Offset+f.Size <= off:
			return -1
		case f.Offset > off:
			return 1
		}
		return 0
	})
	if j == len(idx) {
		return
	}
	if f := &r.cands[idx[j]].Frame; off < f.Offset || off >= f.Offset+f.Size {
		return
	}
	if r.pos[idx[j]] < 0 {
		r.pos[idx[j]] = p
	}
	if _, ok := r.first[d]; !ok {
		r.first[d] = p
	}
	if whole {
		r.whole[d] = true
	}
}

// apply sets the ranks. With P positions handed out: a traced chunk at
// position p gets 2p+1; the other chunks of a content traced whole get
// 2f+2 (f: the content's first position), right after it; the other
// chunks of a content traced chunk by chunk get 2P+1+f, after every traced
// chunk; untraced contents get 3P+1 and keep layer and TOC order.
func (r *ranker) apply() {
	if len(r.first) == 0 {
		return
	}
	p := int64(r.n)
	for i := range r.cands {
		c := &r.cands[i]
		f, traced := r.first[c.Frame.Digest]
		switch {
		case r.pos[i] >= 0:
			c.Rank = 2*int64(r.pos[i]) + 1
		case traced && r.whole[c.Frame.Digest]:
			c.Rank = 2*int64(f) + 2
		case traced:
			c.Rank = 2*p + 1 + int64(f)
		default:
			c.Rank = 3*p + 1
		}
	}
}
