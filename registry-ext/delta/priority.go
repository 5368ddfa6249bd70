package delta

import (
	"cmp"
	"context"
	"slices"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

// Candidate is one chunk of a content the worker lacks, before ordering.
type Candidate struct {
	Frame  api.Frame
	Source Source
	// Layer is the index in the manifest (0 = base) of the layer the chunk
	// is taken from: the first layer holding the content.
	Layer int
	// Entry is the index, in that layer's tree (TOC order), of the first
	// file holding the content; Name is its path.
	Entry int
	Name  string
	// Rank orders the bundle: lower ranks travel first; equal ranks keep
	// layer order, then TOC order, then chunk order. The default is 0 for
	// every candidate, which yields layer order, then TOC order.
	Rank int64
}

// Priority ranks the candidate chunks of a bundle by setting their Rank.
// It sees every layer tree, so it can map what it knows (traced paths per
// layer, content or chunk digests) to the candidates. It must be
// deterministic for identical inputs: a worker resumes a broken stream by
// frame index.
type Priority interface {
	Rank(ctx context.Context, repository string, manifest digest.Digest, layers []api.LayerTree, cands []Candidate) error
}

// PriorityFunc adapts a function to the Priority interface.
type PriorityFunc func(ctx context.Context, repository string, manifest digest.Digest, layers []api.LayerTree, cands []Candidate) error

// Rank calls f.
func (f PriorityFunc) Rank(ctx context.Context, repository string, manifest digest.Digest, layers []api.LayerTree, cands []Candidate) error {
	return f(ctx, repository, manifest, layers, cands)
}

// sortCandidates orders cands by (Rank, Layer, Entry, chunk offset). The
// key is total over distinct chunks, so the order does not depend on the
// sort algorithm.
func sortCandidates(cands []Candidate) {
	slices.SortFunc(cands, func(a, b Candidate) int {
		return cmp.Or(
			cmp.Compare(a.Rank, b.Rank),
			cmp.Compare(a.Layer, b.Layer),
			cmp.Compare(a.Entry, b.Entry),
			cmp.Compare(a.Frame.Offset, b.Frame.Offset),
		)
	})
}
