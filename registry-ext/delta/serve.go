package delta

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
)

const (
	// The stream is flushed after the header, so the worker can mount the
	// image at once, and then whenever this many bytes or this much time
	// have passed: often enough that a slow blob source (a remote storage
	// driver) does not hold back frames already read, rarely enough that
	// a stream of many small files is not one network write per frame.
	flushBytes    = 256 << 10
	flushInterval = 50 * time.Millisecond
)

// ServeDelta answers POST /starlight/delta for the converted platform
// manifest manifestDigest of repository, which the caller resolved from
// req.Reference after authorising the request (and, for req.Have, keeping
// only layers the caller may pull).
//
// The plan is shared: requests for the same manifest, repository, header
// version and layers held get the plan one of them computed (kept for a
// while, within Limits.CacheSize), each streaming from its own resume
// point. A stream holds no tree in memory, only its buffers.
//
// Errors found before the first byte of the bundle (a bad request, an
// unknown manifest, an index or storage failure) are answered with an
// api.Error JSON body and a 4xx/5xx status. Once the bundle has started, a
// failure aborts the response (panic(http.ErrAbortHandler), the net/http
// way to cut a response short), so the client sees a truncated bundle and
// asks again with a resume point. So does a client that accepts no byte
// for Limits.WriteTimeout. Cancellation of r's context stops the stream.
func (p *Planner) ServeDelta(w http.ResponseWriter, r *http.Request, req api.DeltaRequest, manifestDigest digest.Digest, repository string) {
	ctx := r.Context()
	logger := log.G(ctx).WithFields(log.Fields{
		"repository": repository,
		"manifest":   manifestDigest.String(),
	})
	start := time.Now()

	have, err := validateRequest(req)
	if err != nil {
		writeError(ctx, w, err)
		return
	}
	version := bundle.NegotiateVersion(req.HeaderVersion)
	key, err := p.planKey(ctx, repository, manifestDigest, version, have)
	if err != nil {
		writeError(ctx, w, err)
		return
	}
	pl, err := p.plans.get(ctx, key, func(ctx context.Context) (*prepared, error) {
		return p.prepare(ctx, key, repository, manifestDigest, have, version)
	})
	if err != nil {
		writeError(ctx, w, err)
		return
	}
	defer p.plans.release(pl)
	if req.Resume > pl.frames {
		writeError(ctx, w, fmt.Errorf("%w: resume %d is past the %d frames of the bundle", ErrBadRequest, req.Resume, pl.frames))
		return
	}
	sources := pl.sources(req.Resume)
	cache := newBlobCache(p.blobs, repository)
	defer cache.Close()
	// Open the first blob before committing to a 200: a blob missing from
	// storage is then reported as an error, not as a truncated stream.
	var first Source
	if req.Resume < pl.frames {
		if first, err = sources.next(); err == nil {
			_, err = cache.get(ctx, first.Layer)
		}
		if err != nil {
			writeError(ctx, w, err)
			return
		}
	}

	hdr := w.Header()
	hdr.Set("Content-Type", api.MediaTypeBundle)
	hdr.Set("Cache-Control", "no-store")
	hdr.Set(api.HeaderImageBytes, strconv.FormatInt(pl.stats.ImageBytes, 10))
	hdr.Set(api.HeaderDedupBytes, strconv.FormatInt(pl.stats.DedupBytes, 10))
	hdr.Set(api.HeaderSendBytes, strconv.FormatInt(pl.stats.SendBytes, 10))
	fw := newFlushWriter(w, p.limits.WriteTimeout)
	defer fw.clearDeadline()
	if _, err := pl.writeHeader(fw, req.Resume); err != nil {
		abort(ctx, logger, fmt.Errorf("writing the bundle header: %w", err))
		return
	}
	fw.flush()
	logger.WithFields(log.Fields{
		"frames":     pl.frames,
		"resume":     req.Resume,
		"imageBytes": pl.stats.ImageBytes,
		"dedupBytes": pl.stats.DedupBytes,
		"sendBytes":  pl.stats.SendBytes,
	}).Debug("delta bundle header sent")

	for i := req.Resume; i < pl.frames; i++ {
		if ctx.Err() != nil {
			logger.WithField("frame", i).Debug("delta bundle cancelled")
			return
		}
		src := first
		if i > req.Resume {
			src, err = sources.next()
		}
		var rd io.Reader
		if err == nil {
			rd, err = cache.reader(ctx, src.Layer, src.Offset)
		}
		if err == nil {
			err = copyFrame(fw, rd, src)
		}
		if err != nil {
			abort(ctx, logger.WithField("frame", i), err)
			return
		}
		fw.maybeFlush()
	}
	fw.flush()
	if fw.err != nil {
		abort(ctx, logger, fw.err)
		return
	}
	logger.WithFields(log.Fields{
		"bytes":    fw.n,
		"duration": time.Since(start),
	}).Debug("delta bundle sent")
}

// copyFrame copies one frame's raw gzip member from its blob.
func copyFrame(w io.Writer, r io.Reader, src Source) error {
	n, err := io.CopyN(w, r, src.Size)
	if err != nil {
		return fmt.Errorf("copying %d bytes of %s at %d: copied %d: %w", src.Size, src.Layer, src.Offset, n, err)
	}
	return nil
}

// planKey names the plan of a request: everything Plan's answer depends
// on besides the index, and the priority's generation of the index.
func (p *Planner) planKey(ctx context.Context, repository string, manifestDigest digest.Digest, version int, have []string) (string, error) {
	var gen string
	if g, ok := p.priority.(Generational); ok {
		var err error
		if gen, err = g.Generation(ctx); err != nil {
			return "", fmt.Errorf("reading the priority's generation: %w", err)
		}
	}
	sorted := slices.Clone(have)
	slices.Sort(sorted)
	h := sha256.New()
	fmt.Fprintf(h, "%q %q %d %q\n", repository, manifestDigest, version, gen)
	for _, l := range sorted {
		h.Write([]byte(l))
		h.Write([]byte{'\n'})
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// abort cuts a started bundle short. When the client has gone there is
// nobody to tell.
func abort(ctx context.Context, logger *log.Entry, err error) {
	if ctx.Err() != nil {
		logger.WithError(err).Debug("delta bundle cancelled")
		return
	}
	logger.WithError(err).Error("delta bundle aborted")
	panic(http.ErrAbortHandler)
}

// writeError answers with an api.Error body whose status follows the
// error's kind. Details of server-side failures are logged, not sent.
func writeError(ctx context.Context, w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, ErrBadRequest):
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, err.Error())
	case errors.Is(err, ErrNotFound):
		api.WriteError(w, http.StatusNotFound, api.CodeNotFound, err.Error())
	case ctx.Err() != nil:
		// The client has gone; the answer goes nowhere.
	default:
		log.G(ctx).WithError(err).Error("delta bundle failed")
		api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, "computing the delta bundle failed")
	}
}

// flushWriter counts what is written to an HTTP response, flushes it by
// size or age, and keeps a write deadline ahead of every write: a client
// that accepts nothing for the timeout fails the write, which aborts the
// stream and releases what it holds.
type flushWriter struct {
	w       io.Writer
	rc      *http.ResponseController
	timeout time.Duration // <= 0: no deadline
	armed   time.Time     // when the deadline was last pushed back
	n       int64         // bytes written
	pending int64         // bytes written since the last flush
	last    time.Time
	err     error // of the last flush
}

func newFlushWriter(w http.ResponseWriter, timeout time.Duration) *flushWriter {
	return &flushWriter{w: w, rc: http.NewResponseController(w), timeout: timeout, last: time.Now()}
}

// arm pushes the write deadline back to now + timeout, at most once a
// second (a deadline is a timer update, but frames are many and small).
func (f *flushWriter) arm() {
	if f.timeout <= 0 {
		return
	}
	if now := time.Now(); now.Sub(f.armed) >= time.Second {
		// A writer without deadlines (http.ErrNotSupported) cannot be
		// protected; the stream still works.
		_ = f.rc.SetWriteDeadline(now.Add(f.timeout))
		f.armed = now
	}
}

// clearDeadline leaves the connection without a deadline for the next
// request on it (net/http resets it only when the server has a
// WriteTimeout of its own).
func (f *flushWriter) clearDeadline() {
	if f.timeout > 0 && !f.armed.IsZero() {
		_ = f.rc.SetWriteDeadline(time.Time{})
	}
}

func (f *flushWriter) Write(p []byte) (int, error) {
	f.arm()
	n, err := f.w.Write(p)
	f.n += int64(n)
	f.pending += int64(n)
	return n, err
}

func (f *flushWriter) maybeFlush() {
	if f.pending >= flushBytes || (f.pending > 0 && time.Since(f.last) >= flushInterval) {
		f.flush()
	}
}

func (f *flushWriter) flush() {
	f.arm()
	// A writer that cannot flush (http.ErrNotSupported) still delivers
	// everything at the end; a broken connection fails the next Write.
	if err := f.rc.Flush(); err != nil && !errors.Is(err, http.ErrNotSupported) {
		f.err = err
	}
	f.pending = 0
	f.last = time.Now()
}
