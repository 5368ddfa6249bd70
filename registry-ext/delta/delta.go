// Package delta plans and streams the delta bundle of POST /starlight/delta.
//
// A Planner answers one question: given a converted platform manifest and
// the converted layers a worker already holds complete, which file contents
// does the worker lack, in what order should they travel, and where do
// their raw gzip members sit in the stored eStargz blobs? It reads the
// answer from the index database (manifest_layers, layers, files, chunks)
// and streams it with package api/bundle, copying the members from the
// registry's storage without recompressing.
//
// The HTTP route, authentication and the resolution of a reference to a
// converted manifest digest belong to the caller. The wire format is
// documented in docs/BUNDLE.md.
package delta

import (
	"context"
	"database/sql"
	"errors"
	"io"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

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
	// maxParams bounds the parameters of one SQL statement: SQLite's
	// historical limit is 999, PostgreSQL's 65535.
	maxParams = 500
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
	db       *sql.DB
	rebind   func(string) string
	blobs    BlobOpener
	priority Priority
}

// New returns a Planner reading the index from db and blobs from blobs.
// rebind converts the "?" placeholders of the Planner's portable SQL to
// the driver's (identity for SQLite, "$n" for PostgreSQL); nil means
// identity.
func New(db *sql.DB, rebind func(string) string, blobs BlobOpener) *Planner {
	if rebind == nil {
		rebind = func(q string) string { return q }
	}
	return &Planner{db: db, rebind: rebind, blobs: blobs}
}

// WithPriority sets the Priority that orders the frames of every bundle
// (nil restores the default: layer order, then TOC order) and returns p.
// Call it before serving requests.
func (p *Planner) WithPriority(pr Priority) *Planner {
	p.priority = pr
	return p
}
