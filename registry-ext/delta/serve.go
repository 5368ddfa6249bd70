package delta

import (
	"context"
	"errors"
	"io"
	"net/http"
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
// req.Reference after authorising the request.
//
// Errors found before the first byte of the bundle (a bad request, an
// unknown manifest, an index or storage failure) are answered with an
// api.Error JSON body and a 4xx/5xx status. Once the bundle has started, a
// failure aborts the response (panic(http.ErrAbortHandler), the net/http
// way to cut a response short), so the client sees a truncated bundle and
// asks again with a resume point. Cancellation of r's context stops the
// stream.
func (p *Planner) ServeDelta(w http.ResponseWriter, r *http.Request, req api.DeltaRequest, manifestDigest digest.Digest, repository string) {
	ctx := r.Context()
	logger := log.G(ctx).WithFields(log.Fields{
		"repository": repository,
		"manifest":   manifestDigest.String(),
	})
	start := time.Now()

	h, sources, err := p.Plan(ctx, repository, manifestDigest, req)
	if err != nil {
		writeError(ctx, w, err)
		return
	}
	cache := newBlobCache(p.blobs, repository)
	defer cache.Close()
	// Open the first blob before committing to a 200: a blob missing from
	// storage is then reported as an error, not as a truncated stream.
	if h.Resume < len(sources) {
		if _, err := cache.get(ctx, sources[h.Resume].Layer); err != nil {
			writeError(ctx, w, err)
			return
		}
	}

	hdr := w.Header()
	hdr.Set("Content-Type", api.MediaTypeBundle)
	hdr.Set("Cache-Control", "no-store")
	hdr.Set(api.HeaderImageBytes, strconv.FormatInt(h.Stats.ImageBytes, 10))
	hdr.Set(api.HeaderDedupBytes, strconv.FormatInt(h.Stats.DedupBytes, 10))
	hdr.Set(api.HeaderSendBytes, strconv.FormatInt(h.Stats.SendBytes, 10))
	fw := &flushWriter{w: w, rc: http.NewResponseController(w), last: time.Now()}
	bw, err := bundle.NewWriterVersion(fw, h, bundle.NegotiateVersion(req.HeaderVersion))
	if err != nil {
		if fw.n == 0 {
			// Nothing was written (the header could not be encoded):
			// still time for a proper error.
			for _, k := range []string{api.HeaderImageBytes, api.HeaderDedupBytes, api.HeaderSendBytes, "Cache-Control"} {
				hdr.Del(k)
			}
			writeError(ctx, w, err)
			return
		}
		abort(ctx, logger, err)
		return
	}
	fw.flush()
	logger.WithFields(log.Fields{
		"frames":     len(h.Frames),
		"resume":     h.Resume,
		"imageBytes": h.Stats.ImageBytes,
		"dedupBytes": h.Stats.DedupBytes,
		"sendBytes":  h.Stats.SendBytes,
	}).Debug("delta bundle header sent")

	for i := h.Resume; i < len(sources); i++ {
		if ctx.Err() != nil {
			logger.WithField("frame", i).Debug("delta bundle cancelled")
			return
		}
		src := sources[i]
		rd, err := cache.reader(ctx, src.Layer, src.Offset)
		if err == nil {
			err = bw.WriteFrame(rd)
		}
		if err != nil {
			abort(ctx, logger.WithField("frame", i), err)
			return
		}
		fw.maybeFlush()
	}
	fw.flush()
	logger.WithFields(log.Fields{
		"bytes":    fw.n,
		"duration": time.Since(start),
	}).Debug("delta bundle sent")
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

// flushWriter counts what is written to an HTTP response and flushes it
// by size or age.
type flushWriter struct {
	w       io.Writer
	rc      *http.ResponseController
	n       int64 // bytes written
	pending int64 // bytes written since the last flush
	last    time.Time
}

func (f *flushWriter) Write(p []byte) (int, error) {
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
	// A writer that cannot flush (http.ErrNotSupported) still delivers
	// everything at the end; a broken connection fails the next Write.
	_ = f.rc.Flush()
	f.pending = 0
	f.last = time.Now()
}
