// Package demand fetches the chunks a blocked read waits for ahead of the
// bundle stream, with ranged GETs of the converted layer blobs, and holds
// the stream back while it does.
package demand

import (
	"context"
	"fmt"
	"io"
	"sort"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
	"github.com/starlight-project/starlight/worker/store"
)

// Fetcher brings the chunks a blocked read waits for ahead of the
// bundle stream, with ranged GETs of the converted layer blobs (every
// chunk of an eStargz layer is its own gzip member, so a range of the blob
// decodes on its own).
//
// Without traces a bundle arrives in layer order, which rarely is the
// order a container reads its files in; a read that would wait for the
// stream to get there costs one round trip instead. With traces the
// stream already brings the startup files first and demands are rare.
// Both the stream and the fetch may deliver a chunk: the store keeps the
// first verified copy and skips the other. While fetches are in flight the
// stream is held back between frames (holdStream), so that they have the
// link to themselves.
type Fetcher struct {
	store   *store.Store
	sem     chan struct{}
	metrics *demandMetrics

	mu sync.Mutex
	// sources maps a content to the layer blobs that hold it, while a
	// pull is bringing it.
	sources map[digest.Digest][]*demandSource
	// inflight holds the chunks being fetched, by content and offset.
	inflight map[chunkRef]bool
	// fetching counts the fetches started and not finished; idle is
	// closed (and replaced) whenever it drops to 0.
	fetching int
	idle     chan struct{}
	// rtt is a moving estimate of the round trip of a ranged GET (time to
	// the response headers).
	rtt time.Duration
	ctx context.Context
}

// initialRTT is the round-trip estimate before any fetch was timed.
const initialRTT = 100 * time.Millisecond

// maxStreamHold bounds how long one wait of the bundle stream for
// on-demand fetches lasts, so that a slow fetch never starves it.
const maxStreamHold = 2 * time.Second

// fetchTimeout bounds one ranged GET; the bundle brings what a failed
// fetch did not.
const fetchTimeout = time.Minute

type chunkRef struct {
	d   digest.Digest
	off int64
}

// demandSource is one layer blob of a registry, with the chunk layout of
// the content in it.
type demandSource struct {
	blobs  Blobs
	host   string
	repo   string
	layer  digest.Digest
	chunks []api.Chunk // with compressed extents in the layer blob
	stream *Stream
}

// Stream is what the fetcher knows about one bundle stream: where in
// it each chunk comes, and how fast it arrives. A read whose chunk the
// stream will bring sooner than a fetch could is left to the stream: with
// traces, the startup files are at its head, and fetching them again would
// only take bandwidth from it.
type Stream struct {
	// at is the stream offset (compressed bytes of the frames before
	// it, from frame 0) of each chunk the stream carries.
	at      map[chunkRef]int64
	remove  func()
	mu      sync.Mutex
	started time.Time // the first progress report
	bytes   int64     // received so far, from frame 0
	base    int64     // bytes at started (resumed streams start late)
}

// Received reports that the stream has delivered bytes (compressed, from
// frame 0, as store.Progress.Bytes).
func (ds *Stream) Received(bytes int64) {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	if ds.started.IsZero() {
		ds.started, ds.base = time.Now(), bytes
	}
	ds.bytes = bytes
}

// Close unregisters the stream's contents; call it when the stream ended.
func (ds *Stream) Close() { ds.remove() }

// eta estimates when the chunk at stream offset at arrives, from the
// stream's rate so far; ok is false while the rate is unknown.
func (ds *Stream) eta(at int64) (time.Duration, float64, bool) {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	if ds.started.IsZero() {
		return 0, 0, false
	}
	elapsed := time.Since(ds.started).Seconds()
	got := ds.bytes - ds.base
	if elapsed < 0.05 || got <= 0 {
		return 0, 0, false
	}
	rate := float64(got) / elapsed
	ahead := at - ds.bytes
	if ahead < 0 {
		return 0, rate, true // arriving now
	}
	return time.Duration(float64(ahead) / rate * float64(time.Second)), rate, true
}

type demandMetrics struct {
	fetches *prometheus.CounterVec // result: ok, failed
	bytes   prometheus.Counter
	chunks  prometheus.Counter
	left    prometheus.Counter
}

// New returns a fetcher running at most concurrency ranged
// GETs at a time, for as long as ctx lives, and installs it as st's
// demand handler. reg may be nil (no metrics).
func New(ctx context.Context, st *store.Store, concurrency int, reg prometheus.Registerer) *Fetcher {
	f := &Fetcher{
		store:    st,
		sem:      make(chan struct{}, max(concurrency, 1)),
		sources:  make(map[digest.Digest][]*demandSource),
		inflight: make(map[chunkRef]bool),
		idle:     make(chan struct{}),
		rtt:      initialRTT,
		ctx:      ctx,
		metrics: &demandMetrics{
			fetches: prometheus.NewCounterVec(prometheus.CounterOpts{
				Namespace: "starlight", Subsystem: "worker", Name: "demand_fetches_total",
				Help: "Ranged blob GETs for chunks a read was blocked on, by result (ok, failed).",
			}, []string{"result"}),
			bytes: prometheus.NewCounter(prometheus.CounterOpts{
				Namespace: "starlight", Subsystem: "worker", Name: "demand_bytes_total",
				Help: "Compressed bytes fetched on demand, ahead of the bundle stream.",
			}),
			chunks: prometheus.NewCounter(prometheus.CounterOpts{
				Namespace: "starlight", Subsystem: "worker", Name: "demand_chunks_total",
				Help: "Chunks fetched on demand (a chunk the stream delivered meanwhile is fetched but not stored twice).",
			}),
			left: prometheus.NewCounter(prometheus.CounterOpts{
				Namespace: "starlight", Subsystem: "worker", Name: "demand_left_to_stream_total",
				Help: "Blocked reads not fetched on demand because the bundle stream was about to bring their chunk.",
			}),
		},
	}
	if reg != nil {
		reg.MustRegister(f.metrics.fetches, f.metrics.bytes, f.metrics.chunks, f.metrics.left)
	}
	st.SetDemandHandler(f.demand)
	st.SetFrameGate(f.holdStream)
	return f
}

// holdStream waits, up to maxStreamHold, until no on-demand fetch is in
// flight. The bundle stream calls it between frames: a container waits
// for what it fetches on demand, so that goes first on the link.
func (f *Fetcher) holdStream(ctx context.Context) {
	f.mu.Lock()
	if f.fetching == 0 {
		f.mu.Unlock()
		return
	}
	idle := f.idle
	f.mu.Unlock()
	t := time.NewTimer(maxStreamHold)
	defer t.Stop()
	select {
	case <-idle:
	case <-t.C:
	case <-ctx.Done():
	}
}

// Blobs reads ranges of layer blobs: a *remote.Client.
type Blobs interface {
	BlobRange(ctx context.Context, host, repository string, blob digest.Digest, off, length int64) (io.ReadCloser, error)
}

// Add registers where the contents of a bundle can be fetched from: the
// layers of its header, in repository on host, read through blobs. Only contents the bundle
// carries are registered. Report the stream's progress to the returned
// Stream, and Close it when the stream has ended.
func (f *Fetcher) Add(blobs Blobs, host, repository string, h *api.BundleHeader) *Stream {
	ds := &Stream{at: make(map[chunkRef]int64, len(h.Frames))}
	var off int64
	for _, fr := range h.Frames {
		ds.at[chunkRef{digest.Digest(fr.Digest), fr.Offset}] = off
		off += fr.CompressedSize
	}
	type added struct {
		d digest.Digest
		s *demandSource
	}
	var all []added
	f.mu.Lock()
	for i := range h.Layers {
		l := &h.Layers[i]
		layer, err := api.ParseDigest(l.Digest)
		if err != nil {
			continue
		}
		for j := range l.Entries {
			e := &l.Entries[j]
			if e.Type != api.TypeReg || len(e.Chunks) == 0 {
				continue
			}
			d := digest.Digest(e.Digest)
			if _, carried := ds.at[chunkRef{d, 0}]; !carried {
				continue
			}
			s := &demandSource{blobs: blobs, host: host, repo: repository, layer: layer, chunks: e.Chunks, stream: ds}
			f.sources[d] = append(f.sources[d], s)
			all = append(all, added{d, s})
		}
	}
	f.mu.Unlock()
	ds.remove = func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		for _, a := range all {
			srcs := f.sources[a.d]
			for k, s := range srcs {
				if s == a.s {
					srcs = append(srcs[:k], srcs[k+1:]...)
					break
				}
			}
			if len(srcs) == 0 {
				delete(f.sources, a.d)
			} else {
				f.sources[a.d] = srcs
			}
		}
	}
	return ds
}

// demand is the store's demand handler: it starts fetching the chunks of
// dm that are not already being fetched, from the first source that holds
// them all with the same layout. It never blocks.
func (f *Fetcher) demand(dm store.Demand) {
	f.mu.Lock()
	var src *demandSource
	var want []api.Chunk
	for _, s := range f.sources[dm.Digest] {
		if cs, ok := s.locate(dm.Chunks); ok {
			src, want = s, cs
			break
		}
	}
	if src == nil {
		f.mu.Unlock()
		return
	}
	// The first chunk is the one the read waits for. If a stream brings
	// it before a GET could (one round trip plus the bytes at the
	// stream's rate), leave it to the stream. A GET also costs the
	// stream (it holds the stream back and repeats bytes the stream will
	// send), so it has to be twice as fast to be worth it.
	first := dm.Chunks[0]
	for _, s := range f.sources[dm.Digest] {
		at, ok := s.stream.at[chunkRef{dm.Digest, first.Offset}]
		if !ok {
			continue
		}
		if eta, rate, ok := s.stream.eta(at); ok {
			fetch := f.rtt + time.Duration(float64(want[0].CompressedSize)/rate*float64(time.Second))
			if eta <= 2*fetch {
				f.mu.Unlock()
				f.metrics.left.Inc()
				return
			}
		}
	}
	todo := want[:0:0]
	for _, c := range want {
		k := chunkRef{dm.Digest, c.Offset}
		if !f.inflight[k] {
			f.inflight[k] = true
			todo = append(todo, c)
		}
	}
	runs := contiguousRuns(todo)
	f.fetching += len(runs)
	f.mu.Unlock()
	for _, run := range runs {
		go f.fetch(dm.Digest, src, run)
	}
}

// locate returns the source's chunks (with their compressed extents) for
// the given chunks, or false if the source stores the content with another
// layout.
func (s *demandSource) locate(chunks []api.Chunk) ([]api.Chunk, bool) {
	out := make([]api.Chunk, 0, len(chunks))
	for _, c := range chunks {
		i := sort.Search(len(s.chunks), func(i int) bool { return s.chunks[i].Offset >= c.Offset })
		if i == len(s.chunks) || s.chunks[i].Offset != c.Offset || s.chunks[i].Size != c.Size ||
			s.chunks[i].Digest != c.Digest || s.chunks[i].CompressedSize <= 0 {
			return nil, false
		}
		out = append(out, s.chunks[i])
	}
	return out, true
}

// contiguousRuns splits chunks (in file order) into runs whose gzip members
// follow each other in the blob, so that each run is one ranged GET.
func contiguousRuns(chunks []api.Chunk) [][]api.Chunk {
	var runs [][]api.Chunk
	for i, c := range chunks {
		if i > 0 {
			prev := chunks[i-1]
			if c.CompressedOffset == prev.CompressedOffset+prev.CompressedSize {
				runs[len(runs)-1] = append(runs[len(runs)-1], c)
				continue
			}
		}
		runs = append(runs, []api.Chunk{c})
	}
	return runs
}

// fetch GETs one run of chunks and stores them.
func (f *Fetcher) fetch(d digest.Digest, src *demandSource, run []api.Chunk) {
	defer func() {
		f.mu.Lock()
		for _, c := range run {
			delete(f.inflight, chunkRef{d, c.Offset})
		}
		if f.fetching--; f.fetching == 0 {
			close(f.idle)
			f.idle = make(chan struct{})
		}
		f.mu.Unlock()
	}()
	select {
	case f.sem <- struct{}{}:
	case <-f.ctx.Done():
		return
	}
	defer func() { <-f.sem }()
	if err := f.fetchRun(d, src, run); err != nil {
		f.metrics.fetches.WithLabelValues("failed").Inc()
		// The bundle still brings the chunks; the read waits for it.
		log.G(f.ctx).WithError(err).WithField("content", d).WithField("layer", src.layer).
			Warn("on-demand fetch failed; waiting for the bundle stream")
		return
	}
	f.metrics.fetches.WithLabelValues("ok").Inc()
}

func (f *Fetcher) fetchRun(d digest.Digest, src *demandSource, run []api.Chunk) error {
	start := run[0].CompressedOffset
	last := run[len(run)-1]
	length := last.CompressedOffset + last.CompressedSize - start
	ctx, cancel := context.WithTimeout(f.ctx, fetchTimeout)
	defer cancel()
	sent := time.Now()
	body, err := src.blobs.BlobRange(ctx, src.host, src.repo, src.layer, start, length)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.rtt = (3*f.rtt + time.Since(sent)) / 4
	f.mu.Unlock()
	defer body.Close()
	for _, c := range run {
		member := &io.LimitedReader{R: body, N: c.CompressedSize}
		fr := api.Frame{Digest: d.String(), Offset: c.Offset, Size: c.Size, ChunkDigest: c.Digest, CompressedSize: c.CompressedSize}
		data, err := bundle.Decode(fr, member)
		if err != nil {
			return fmt.Errorf("chunk %s@%d: %w", d, c.Offset, err)
		}
		if err := f.store.WriteChunk(fr, data); err != nil {
			return err
		}
		// WriteChunk skips a chunk that arrived meanwhile; the
		// decoder stops at the end of the data. Either way the rest of
		// the member precedes the next one.
		if _, err := io.Copy(io.Discard, member); err != nil {
			return fmt.Errorf("chunk %s@%d: %w", d, c.Offset, err)
		}
		if member.N > 0 {
			return fmt.Errorf("chunk %s@%d: %w", d, c.Offset, io.ErrUnexpectedEOF)
		}
		f.metrics.bytes.Add(float64(c.CompressedSize))
		f.metrics.chunks.Inc()
	}
	return nil
}
