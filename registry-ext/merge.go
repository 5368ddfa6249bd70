package registryext

import (
	"cmp"
	"slices"

	"github.com/starlight-project/starlight/schema"
)

// traceKey identifies a traced item: one chunk of one file of one layer.
type traceKey struct {
	layer, name string
	offset      int64
}

// mergeTraces merges the runs of one manifest into one priority, first
// item first. layers are the manifest's layer digests, base first; they
// break the last ties. The algorithm (docs/TRACES.md):
//
//  1. A run is the same run reported twice when worker, container and
//     start time agree; it counts once (its longest report).
//  2. In each run, every item with content gets its first-access rank:
//     0 for the first item the run touched, 1 for the next, and so on.
//     Ranks, not times, because a run's times include waiting for
//     contents to arrive and machines differ in speed, while the order
//     in which a program touches its files is stable.
//  3. An item's score is the median of its ranks over the runs that saw
//     it. Runs that did not see an item do not push it back: an item only
//     one run saw lands where that run needed it.
//  4. Items are ordered by score; ties go to the item more runs saw, then
//     to the earlier median time, then layer (base first), name, offset.
//
// An item is marked Whole when a run that recorded only whole-file opens
// (no access at a chunk offset > 0) saw it: such a run cannot tell which
// chunks were read, so the rest of the file should travel with it.
func mergeTraces(layers []string, runs []schema.TraceRun) []schema.PriorityItem {
	runs = distinctRuns(runs)
	layerIndex := make(map[string]int, len(layers))
	for i, l := range layers {
		layerIndex[l] = i
	}
	type stat struct {
		key    traceKey
		digest string
		ranks  []int64
		times  []int64
		whole  bool
	}
	stats := map[traceKey]*stat{}
	var order []*stat // first-seen order, so nothing depends on map order
	for _, r := range runs {
		fileLevel := true
		for _, e := range r.Entries {
			if e.ChunkOffset > 0 {
				fileLevel = false
				break
			}
		}
		seen := make(map[traceKey]struct{}, len(r.Entries))
		var rank int64
		for _, e := range r.Entries {
			if e.Digest == "" {
				continue // no content travels for it
			}
			k := traceKey{e.Layer, e.Name, e.ChunkOffset}
			if _, dup := seen[k]; dup {
				continue
			}
			seen[k] = struct{}{}
			s := stats[k]
			if s == nil {
				s = &stat{key: k, digest: e.Digest}
				stats[k] = s
				order = append(order, s)
			}
			s.ranks = append(s.ranks, rank)
			s.times = append(s.times, e.TimeNS)
			s.whole = s.whole || (fileLevel && e.ChunkOffset == 0)
			rank++
		}
	}
	type scored struct {
		*stat
		score int64 // twice the median rank, to stay in integers
		time  int64 // median time, halved the same way
		layer int
	}
	items := make([]scored, len(order))
	for i, s := range order {
		layer, ok := layerIndex[s.key.layer]
		if !ok {
			layer = len(layers)
		}
		items[i] = scored{stat: s, score: median2(s.ranks), time: median2(s.times), layer: layer}
	}
	slices.SortFunc(items, func(a, b scored) int {
		return cmp.Or(
			cmp.Compare(a.score, b.score),
			-cmp.Compare(len(a.ranks), len(b.ranks)),
			cmp.Compare(a.time, b.time),
			cmp.Compare(a.layer, b.layer),
			cmp.Compare(a.key.layer, b.key.layer),
			cmp.Compare(a.key.name, b.key.name),
			cmp.Compare(a.key.offset, b.key.offset),
		)
	})
	out := make([]schema.PriorityItem, len(items))
	for i, it := range items {
		out[i] = schema.PriorityItem{Layer: it.key.layer, Name: it.key.name, ChunkOffset: it.key.offset,
			Digest: it.digest, Whole: it.whole, Runs: len(it.ranks)}
	}
	return out
}

// median2 returns twice the median of vs (the sum of the two middle
// values for an even count), which orders like the median without
// fractions. vs is sorted in place.
func median2(vs []int64) int64 {
	slices.Sort(vs)
	n := len(vs)
	if n%2 == 1 {
		return 2 * vs[n/2]
	}
	return vs[n/2-1] + vs[n/2]
}

// distinctRuns drops all but one report of the same run (same worker,
// container and start time): the one with the most accesses, and of
// those the first given. Reports without a container name are distinct.
func distinctRuns(runs []schema.TraceRun) []schema.TraceRun {
	type runID struct {
		worker, container string
		started           int64
	}
	best := map[runID]int{}
	keep := make([]bool, len(runs))
	for i, r := range runs {
		if r.Container == "" {
			keep[i] = true
			continue
		}
		id := runID{r.Worker, r.Container, r.StartedAt.UnixNano()}
		j, ok := best[id]
		switch {
		case !ok:
			best[id] = i
			keep[i] = true
		case len(r.Entries) > len(runs[j].Entries):
			keep[j], keep[i] = false, true
			best[id] = i
		}
	}
	out := runs[:0:0]
	for i, r := range runs {
		if keep[i] {
			out = append(out, r)
		}
	}
	return out
}
