package pull

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/containerd/continuity"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
	"github.com/starlight-project/starlight/worker/demand"
	"github.com/starlight-project/starlight/worker/importer"
)

// A pull the worker's stop (or crash) interrupts resumes at the next start.
// Next to its image record (<key>.json) the pull keeps, from the moment
// its bundle header arrived:
//
//	<key>.resume   the delta request (the same request, so the same frame
//	               order: the registry's stream is deterministic for it)
//	               and whether containerd unpacks the image itself (CRI)
//	<key>.header   the bundle header, in the bundle's own encoding
//
// At start the header's contents are expected again before any layer view
// is served (the views of a restarted worker take over the mounts the
// containers use, and their reads must wait, not fail), what arrived is
// re-verified from the partial files, and the stream is asked for from the
// first frame whose chunk is missing. A pull interrupted before its header
// arrived starts again.

// resumeRecord is <key>.resume.
type resumeRecord struct {
	Request api.DeltaRequest `json:"request"`
	CRI     bool             `json:"cri,omitempty"`
}

// resumable is an interrupted pull loaded at start.
type resumable struct {
	job     *Job
	ref     Ref
	request api.PullRequest // a pull interrupted before its header
	rec     resumeRecord
	header  *api.BundleHeader
	from    int // first frame whose chunk is missing
}

func (pl *Puller) resumePaths(img api.WorkerImage) (record, header string) {
	base := strings.TrimSuffix(pl.recordPath(img.Namespace, img.Ref), ".json")
	return base + ".resume", base + ".header"
}

// saveResumable writes what resuming p needs: req and the header h.
func (pl *Puller) saveResumable(p *Job, req api.DeltaRequest, h *api.BundleHeader) error {
	img, _ := p.Snapshot()
	recPath, hdrPath := pl.resumePaths(img)
	hc := *h
	hc.Resume = 0
	var buf bytes.Buffer
	if _, err := bundle.NewWriterVersion(&buf, &hc, bundle.Version); err != nil {
		return fmt.Errorf("saving the bundle header: %w", err)
	}
	if err := continuity.AtomicWriteFile(hdrPath, buf.Bytes(), 0o600); err != nil {
		return fmt.Errorf("saving the bundle header: %w", err)
	}
	b, err := json.Marshal(resumeRecord{Request: req, CRI: p.cri})
	if err != nil {
		return err
	}
	if err := continuity.AtomicWriteFile(recPath, b, 0o600); err != nil {
		return fmt.Errorf("saving the resume record: %w", err)
	}
	return nil
}

// removeResumable forgets the resume state of a pull that ended.
func (pl *Puller) removeResumable(p *Job) {
	img, _ := p.Snapshot()
	recPath, hdrPath := pl.resumePaths(img)
	for _, f := range []string{recPath, hdrPath} {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			log.L.WithError(err).WithField("ref", img.Ref).Warn("removing the resume state of a pull")
		}
	}
}

// loadResumable prepares the resumption of the interrupted pull of job:
// its contents are expected again and its resume point found.
func (pl *Puller) loadResumable(job *Job) (*resumable, error) {
	img := job.img
	ref, err := ParseRef(img.Ref)
	if err != nil {
		return nil, err
	}
	recPath, hdrPath := pl.resumePaths(img)
	b, err := os.ReadFile(recPath)
	if errors.Is(err, os.ErrNotExist) && img.State == api.PullResolving {
		// Stopped before the registry answered: pull again.
		return &resumable{job: job, ref: ref, request: api.PullRequest{
			Ref: img.Ref, Namespace: img.Namespace, Platform: img.Platform, PlainHTTP: img.PlainHTTP,
		}}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("no resume record: %w", err)
	}
	r := &resumable{job: job, ref: ref}
	if err := json.Unmarshal(b, &r.rec); err != nil {
		return nil, fmt.Errorf("resume record: %w", err)
	}
	f, err := os.Open(hdrPath)
	if err != nil {
		return nil, fmt.Errorf("saved bundle header: %w", err)
	}
	defer f.Close()
	br, err := bundle.NewReader(f)
	if err != nil {
		return nil, fmt.Errorf("saved bundle header: %w", err)
	}
	h := br.Header()
	for i := range h.Layers {
		if err := pl.layers.Add(&h.Layers[i]); err != nil {
			return nil, err
		}
	}
	// Re-verifies what arrived of each content.
	if err := pl.store.ExpectHeader(h); err != nil {
		return nil, err
	}
	r.header = h
	r.from = len(h.Frames)
	for i, fr := range h.Frames {
		if !pl.store.HasChunk(digest.Digest(fr.Digest), fr.Offset) {
			r.from = i
			break
		}
	}
	var bytesIn int64
	for _, fr := range h.Frames[:r.from] {
		bytesIn += fr.CompressedSize
	}
	files := 0
	for d := range framesContents(h.Frames) {
		if pl.store.Has(digest.Digest(d)) {
			files++
		}
	}
	job.cri = r.rec.CRI
	job.platform = r.rec.Request.Platform
	if job.cri {
		job.platform = api.Platform{}
	}
	state := img.State
	if state == api.PullResolving {
		state = api.PullImporting
	}
	job.img.State = state
	job.img.Error = ""
	job.img.BytesReceived, job.img.FramesReceived, job.img.FilesReceived = bytesIn, r.from, files
	job.active = true
	return r, nil
}

// resume starts an interrupted pull again.
func (pl *Puller) resume(r *resumable) {
	if r.header == nil {
		r.job.img.State = api.PullFailed
		r.job.img.Error = "interrupted by a worker restart before the registry answered; pulling again"
		if _, err := pl.Start(r.request); err != nil {
			r.job.img.Error = "interrupted by a worker restart before the registry answered; pull again: " + err.Error()
		}
		return
	}
	ep, err := ResolveEndpoint(pl.cfg, r.ref, r.job.img.PlainHTTP)
	if err != nil {
		r.job.img.State, r.job.img.Error, r.job.active = api.PullFailed, "resuming after a restart: "+err.Error(), false
		return
	}
	log.L.WithFields(log.Fields{"ref": r.ref.Name, "resume": r.from, "frames": len(r.header.Frames)}).
		Info("resuming the pull interrupted by the worker's stop")
	pl.wg.Add(1)
	go func() {
		defer pl.wg.Done()
		pl.finishRun(r.job, r.ref, func(ctx context.Context) error { return pl.resumed(ctx, r, ep) })
	}()
}

// resumed is the rest of an interrupted pull: the import if it had not
// happened, then the contents from the first frame missing.
func (pl *Puller) resumed(ctx context.Context, r *resumable, ep Endpoint) error {
	select {
	case pl.sem <- struct{}{}:
	case <-ctx.Done():
		return errShutdown
	}
	defer func() { <-pl.sem }()
	pl.metrics.ActivePulls.Inc()
	defer pl.metrics.ActivePulls.Dec()
	start := time.Now()
	p, ref, h := r.job, r.ref, r.header
	rc := pl.client(p, ep)
	var stream *demand.Stream
	if pl.demand != nil {
		stream = pl.demand.Add(rc, ref.Host, ref.Repository, h)
		defer stream.Close()
	}
	if img, _ := p.Snapshot(); img.State == api.PullImporting && !p.cri {
		plan, err := importer.PlanImage(h)
		if err != nil {
			return fmt.Errorf("%s: %w", ref.Name, err)
		}
		if err := pl.importer.Import(ctx, ref.Name, plan); err != nil {
			if ctx.Err() != nil {
				return errShutdown
			}
			return fmt.Errorf("%s: %w", ref.Name, err)
		}
	}
	p.update(func(img *api.WorkerImage) {
		if img.Ready == nil {
			now := time.Now().UTC()
			img.Ready = &now
		}
		img.State = api.PullReady
	})
	pl.save(p)
	if r.from < len(h.Frames) {
		var body io.ReadCloser
		if err := pl.receive(ctx, p, ref, ep, r.rec.Request, h.Frames, nil, &body, stream, r.from); err != nil {
			return err
		}
	}
	return pl.complete(ctx, p, ref, h, start)
}

func framesContents(frames []api.Frame) map[string]bool {
	seen := make(map[string]bool)
	for _, f := range frames {
		seen[f.Digest] = true
	}
	return seen
}
