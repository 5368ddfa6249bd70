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
	"time"

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
	MaxHave = api.MaxHave
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
	limits   Limits
	plans    *planCache
}

// Limits bound what serving bundles costs the registry, whatever the
// traffic. Zero fields take the defaults.
type Limits struct {
	// WriteTimeout aborts a stream whose client has accepted no byte for
	// that long (a reader that stalls), so it releases what it holds.
	// Negative: no limit.
	WriteTimeout time.Duration
	// Plans bounds the plans computed at once. A plan holds its image's
	// trees in memory while it runs (some 200 MB for 100,000 files);
	// requests beyond the bound wait. Concurrent requests for the same
	// plan share one computation.
	Plans int
	// CacheSize bounds the bytes of computed plans kept for the requests
	// that follow (temporary disk: an encoded header and 20 bytes per
	// frame, about 5 MB for 100,000 files). Negative: none is kept.
	CacheSize int64
	// SpoolDir is where plans are spooled, as unlinked temporary files
	// ("": os.TempDir()).
	SpoolDir string
}

// Defaults of Limits.
const (
	DefaultWriteTimeout = time.Minute
	DefaultPlans        = 2
	DefaultCacheSize    = 256 << 20
)

const (
	// planTTL is how long a computed plan answers the requests that
	// follow. Within it a new trace merge starts a new plan at once (the
	// key has the priority's generation), but a layer of a worker's
	// inventory indexed meanwhile is only deduplicated after it; a
	// resumed stream within it gets exactly the frames it expects.
	planTTL = 2 * time.Minute
	// planCacheEntries bounds the plans kept, each an open file.
	planCacheEntries = 128
)

func (l Limits) withDefaults() Limits {
	if l.WriteTimeout == 0 {
		l.WriteTimeout = DefaultWriteTimeout
	}
	if l.Plans <= 0 {
		l.Plans = DefaultPlans
	}
	if l.CacheSize == 0 {
		l.CacheSize = DefaultCacheSize
	}
	return l
}

// New returns a Planner reading the index from index and blobs from blobs,
// with the default Limits.
func New(index Index, blobs BlobOpener) *Planner {
	p := &Planner{index: index, blobs: blobs}
	return p.WithLimits(Limits{})
}

// WithPriority sets the Priority that orders the frames of every bundle
// (nil restores the default: layer order, then TOC order) and returns p.
// Call it before serving requests.
func (p *Planner) WithPriority(pr Priority) *Planner {
	p.priority = pr
	return p
}

// WithLimits sets the Limits of serving and returns p. Call it before
// serving requests.
func (p *Planner) WithLimits(l Limits) *Planner {
	if p.plans != nil {
		p.plans.close()
	}
	p.limits = l.withDefaults()
	p.plans = newPlanCache(p.limits)
	return p
}

// Close drops the plans kept for reuse. Streams still running finish.
func (p *Planner) Close() {
	p.plans.close()
}

// PlanStats counts the plans computed, and the requests that were served
// a plan another request computed (kept, or being computed).
type PlanStats struct {
	Computed, Reused int64
}

// Stats returns the plan counters since New.
func (p *Planner) Stats() PlanStats {
	return PlanStats{Computed: p.plans.computed.Load(), Reused: p.plans.reused.Load()}
}

// Generational is implemented by a Priority whose ranking changes with
// the index (Traced: with every trace merge). A plan is shared only
// between requests that see the same generation.
type Generational interface {
	Generation(ctx context.Context) (string, error)
}
