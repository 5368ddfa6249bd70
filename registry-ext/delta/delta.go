// Package delta plans and streams the delta bundle of POST /starlight/delta.
//
// A Planner answers one question: given a converted platform manifest and
// the converted layers a worker already holds complete, which file contents
// does the worker lack, in what order should they travel, and where do
// their raw gzip members sit in the stored eStargz blobs? It reads the
// answer from the index (an Index: the database of package schema, which
// owns every SQL statement) and streams it with package api/bundle,
// copying the members from the registry's storage without recompressing.
//
// The HTTP route, authentication and the resolution of a reference to a
// converted manifest digest belong to the caller. The wire format is
// documented in docs/BUNDLE.md.
package delta

import (
	"context"
	"errors"
	"io"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

// Index is the part of the index database a Planner reads. *schema.DB
// implements it; tests use an in-memory fake.
type Index interface {
	// ManifestTrees returns the layer trees of a converted manifest,
	// base first, each in TOC order, with OriginalDigest unset. A
	// manifest that is not (yet) indexed is an error wrapping
	// schema.ErrNotFound.
	ManifestTrees(ctx context.Context, manifestDigest string) ([]api.LayerTree, error)
	// OriginalManifests returns the pushed platform manifests of
	// repository that converted to manifestDigest, other than itself,
	// without duplicates and in a deterministic order.
	OriginalManifests(ctx context.Context, repository, manifestDigest string) ([]string, error)
	// ContentsInLayers returns the digests of contents that some file of
	// layers holds, in any image or repository.
	ContentsInLayers(ctx context.Context, layers []string, contents map[string]struct{}) (map[string]struct{}, error)
}

// BlobOpener opens a stored layer blob for random access (the registry's
// storage driver). Manifests and configs are read through it too, since
// distribution stores them as blobs. An absent blob should be reported with
// an error wrapping fs.ErrNotExist.
type BlobOpener interface {
	OpenBlob(ctx context.Context, repository string, dgst digest.Digest) (io.ReadSeekCloser, error)
}

// Source locates the raw bytes of one frame: a gzip member of a stored
// eStargz layer blob.
type Source struct {
	Layer  digest.Digest // converted layer blob
	Offset int64         // compressed offset of the member in the blob
	Size   int64         // compressed size of the member
}

// Limits on untrusted requests.
const (
	// MaxHave bounds DeltaRequest.Have. A worker with more complete layers
	// than this sends the ones most likely to matter (the caller decides).
	MaxHave = 10000
	// maxManifestSize and maxConfigSize bound the JSON read from storage.
	maxManifestSize = api.MaxManifestSize
	maxConfigSize   = api.MaxConfigSize
)

// Errors a Plan may wrap; ServeDelta maps them to HTTP statuses.
var (
	// ErrBadRequest marks a request that can never succeed as sent (400).
	ErrBadRequest = errors.New("bad delta request")
	// ErrNotFound marks a manifest that is not (or not yet) indexed (404).
	ErrNotFound = errors.New("not found")
)

// Planner computes and streams delta bundles. It is safe for concurrent
// use.
type Planner struct {
	index    Index
	blobs    BlobOpener
	priority Priority
}

// New returns a Planner reading the index from index and blobs from blobs.
func New(index Index, blobs BlobOpener) *Planner {
	return &Planner{index: index, blobs: blobs}
}

// WithPriority sets the Priority that orders the frames of every bundle
// (nil restores the default: layer order, then TOC order) and returns p.
// Call it before serving requests.
func (p *Planner) WithPriority(pr Priority) *Planner {
	p.priority = pr
	return p
}
