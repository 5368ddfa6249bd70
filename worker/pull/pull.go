// Package pull runs the worker's pulls: one delta request per image, the
// image made usable in containerd as soon as the bundle header arrives, the
// contents received in the background, a broken stream resumed. It keeps
// the image records (`ctr-starlight images`) and fetches the images a
// Kubernetes (CRI) pull unpacks into the starlight snapshotter.
package pull

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/identifiers"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/continuity"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
	"github.com/starlight-project/starlight/api/remote"
	"github.com/starlight-project/starlight/worker/config"
	"github.com/starlight-project/starlight/worker/demand"
	"github.com/starlight-project/starlight/worker/importer"
	"github.com/starlight-project/starlight/worker/layers"
	"github.com/starlight-project/starlight/worker/store"
)

// Puller runs pulls: one delta request per image, the image made usable in
// containerd as soon as the bundle header arrives, the contents received in
// the background, a broken stream resumed.
type Puller struct {
	cfg      *config.Config
	store    *store.Store
	layers   *layers.Registry
	remote   *remote.Client
	importer *importer.Importer
	metrics  *Metrics
	// demand fetches the chunks blocked reads wait for ahead of the
	// bundle stream; nil when disabled.
	demand *demand.Fetcher
	// clientWith and criCredentials: Deps.ClientWith and
	// Deps.CRICredentials.
	clientWith     func(first remote.CredentialFunc) *remote.Client
	criCredentials func(imageRef string) (remote.CredentialFunc, bool)
	// recordDir holds one JSON record per image (api.WorkerImage), so
	// that `ctr-starlight images` survives a worker restart.
	recordDir string
	// backoff is the wait before the first resume of a broken stream;
	// it doubles on every further attempt, up to 30s.
	backoff time.Duration
	// limits bound the bundle headers the puller accepts.
	limits bundle.Limits

	sem    chan struct{}
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	pulls map[string]*Job
	// cri holds the CRI fetches by manifest digest, so that the Prepares
	// of every layer of an image share one pull.
	cri map[digest.Digest]*criFetch

	// gcLock keeps the garbage collector away from the moment a pull
	// sends the layers it holds (Have) until the layers it receives are
	// recorded: the registry leaves out the contents of Have, so they
	// must still be there when the bundle arrives. Pulls share it; a
	// collection takes it alone (BlockPulls).
	gcLock sync.RWMutex
}

// Deps are what a Puller works with.
type Deps struct {
	Store    *store.Store
	Layers   *layers.Registry
	Remote   *remote.Client
	Importer *importer.Importer
	// Demand, if not nil, fetches what blocked reads wait for ahead of
	// the bundle stream.
	Demand  *demand.Fetcher
	Metrics *Metrics
	// ClientWith returns a registry client like Remote whose hosts try
	// first for credentials: the client of a pull that has credentials
	// of its own (PullRequest.User, a pod's pull secret). The pull, its
	// resumes and its on-demand reads use it, and it goes with the job.
	// nil: such credentials are refused.
	ClientWith func(first remote.CredentialFunc) *remote.Client
	// CRICredentials, if set, returns the credentials of the CRI pull of
	// imageRef in flight, if it carries any (the CRI proxy's Secrets).
	CRICredentials func(imageRef string) (remote.CredentialFunc, bool)
	// RecordDir holds the image records.
	RecordDir string
	// Backoff is the wait before the first resume of a broken stream
	// (default DefaultBackoff); it doubles on every further attempt, up
	// to 30s.
	Backoff time.Duration
	// BundleLimits bound the bundle headers accepted (zero fields:
	// bundle.DefaultLimits).
	BundleLimits bundle.Limits
}

// DefaultBackoff is the default wait before resuming a broken stream.
const DefaultBackoff = time.Second

// Job is the pull of one image and its state. Its watchers wait on the
// channel Snapshot returns, which is closed and replaced at every update.
type Job struct {
	mu      sync.Mutex
	img     api.WorkerImage
	changed chan struct{}
	active  bool
	// cri marks a pull started by a CRI Prepare: containerd is unpacking
	// the image itself, so the pull leaves containerd alone and only
	// signals header once the layers are recorded.
	cri    bool
	header func(error)
	// platform is the platform the delta request asks for; zero for a
	// CRI pull, which names its platform manifest by digest.
	platform api.Platform
	// remote, if set, is the job's own registry client (a CRI pull with
	// the pod's credentials), kept in memory for the life of the job.
	remote *remote.Client
}

// Snapshot returns the image's state now, and a channel closed at the
// next change.
func (p *Job) Snapshot() (api.WorkerImage, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	img := p.img
	img.Layers = append([]string(nil), p.img.Layers...)
	return img, p.changed
}

func (p *Job) update(fn func(img *api.WorkerImage)) {
	p.mu.Lock()
	fn(&p.img)
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
}

func imageKey(namespace, ref string) string { return namespace + "\x00" + ref }

// New loads the image records under deps.RecordDir. A pull that was still
// running when the worker stopped (or crashed) resumes by itself, from what
// had arrived: its contents are expected again at once (reads through the
// views wait for them instead of failing) and the stream is asked for from
// the first frame missing (resume.go).
func New(cfg *config.Config, deps Deps) (*Puller, error) {
	recordDir := deps.RecordDir
	if err := os.MkdirAll(recordDir, 0o700); err != nil {
		return nil, fmt.Errorf("opening image records: %w", err)
	}
	if deps.Backoff <= 0 {
		deps.Backoff = DefaultBackoff
	}
	ctx, cancel := context.WithCancel(context.Background())
	pl := &Puller{
		cfg: cfg, store: deps.Store, layers: deps.Layers, remote: deps.Remote, importer: deps.Importer,
		metrics: deps.Metrics, demand: deps.Demand,
		clientWith: deps.ClientWith, criCredentials: deps.CRICredentials,
		recordDir: recordDir,
		backoff:   deps.Backoff,
		limits:    deps.BundleLimits,
		sem:       make(chan struct{}, cfg.MaxConcurrentPulls),
		ctx:       ctx, cancel: cancel,
		pulls: make(map[string]*Job),
		cri:   make(map[digest.Digest]*criFetch),
	}
	files, err := filepath.Glob(filepath.Join(recordDir, "*.json"))
	if err != nil {
		return nil, err
	}
	var resumable []*resumable
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var img api.WorkerImage
		if json.Unmarshal(b, &img) != nil || img.Ref == "" {
			continue
		}
		job := &Job{img: img, changed: make(chan struct{})}
		pl.pulls[imageKey(img.Namespace, img.Ref)] = job
		if img.State != api.PullComplete && img.State != api.PullFailed {
			r, err := pl.loadResumable(job)
			if err != nil {
				log.L.WithError(err).WithField("ref", img.Ref).Warn("cannot resume the pull interrupted by the worker's stop")
				job.img.State = api.PullFailed
				job.img.Error = "interrupted by a worker restart and not resumable (" + err.Error() + "); pull again"
				continue
			}
			resumable = append(resumable, r)
		}
	}
	// Started once every record is loaded: a resumed pull saves its
	// record, and Start may restart one.
	for _, r := range resumable {
		pl.resume(r)
	}
	return pl, nil
}

// Close stops every running pull and waits for them. Contents that did not
// arrive stay pending (partial files are kept for the next attempt).
func (pl *Puller) Close() error {
	pl.cancel()
	pl.wg.Wait()
	return nil
}

// Images returns the state of every image, sorted by namespace and ref.
func (pl *Puller) Images() []api.WorkerImage {
	pl.mu.Lock()
	ps := make([]*Job, 0, len(pl.pulls))
	for _, p := range pl.pulls {
		ps = append(ps, p)
	}
	pl.mu.Unlock()
	out := make([]api.WorkerImage, 0, len(ps))
	for _, p := range ps {
		img, _ := p.Snapshot()
		out = append(out, img)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Namespace != out[j].Namespace {
			return out[i].Namespace < out[j].Namespace
		}
		return out[i].Ref < out[j].Ref
	})
	return out
}

// Image returns the state of ref. With an empty namespace any namespace
// matches (the first in order).
func (pl *Puller) Image(ref, namespace string) (api.WorkerImage, bool) {
	for _, img := range pl.Images() {
		if img.Ref == ref && (namespace == "" || img.Namespace == namespace) {
			return img, true
		}
	}
	return api.WorkerImage{}, false
}

// Start starts pulling req.Ref, or joins the pull of the same image that
// is already running. The returned pull reports its progress.
func (pl *Puller) Start(req api.PullRequest) (*Job, error) {
	if req.Namespace == "" {
		req.Namespace = namespaces.Default
	}
	if err := identifiers.Validate(req.Namespace); err != nil {
		return nil, fmt.Errorf("invalid namespace: %w", err)
	}
	ref, err := ParseRef(req.Ref)
	if err != nil {
		return nil, err
	}
	platform, err := ParsePlatform(req.Platform)
	if err != nil {
		return nil, err
	}
	ep, err := ResolveEndpoint(pl.cfg, ref, req.PlainHTTP)
	if err != nil {
		return nil, err
	}
	if pl.ctx.Err() != nil {
		return nil, errors.New("the worker is shutting down")
	}
	key := imageKey(req.Namespace, ref.Name)
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if p, ok := pl.pulls[key]; ok {
		p.mu.Lock()
		active := p.active
		p.mu.Unlock()
		if active {
			if p.platform != (api.Platform{}) && p.platform != platform {
				return nil, fmt.Errorf("%s is being pulled for %s; wait for that pull to end before pulling it for %s", ref.Name, p.platform, platform)
			}
			return p, nil
		}
	}
	p := &Job{
		img: api.WorkerImage{
			Ref: ref.Name, Namespace: req.Namespace, State: api.PullResolving, Platform: platform.String(),
			Started: time.Now().UTC(), PlainHTTP: ep.Registry.PlainHTTP,
		},
		changed:  make(chan struct{}),
		active:   true,
		platform: platform,
	}
	if req.User != "" {
		if pl.clientWith == nil {
			return nil, errors.New("this worker takes no credentials with a pull request")
		}
		p.remote = pl.clientWith(userCredentials(req.User))
	}
	pl.pulls[key] = p
	pl.wg.Add(1)
	go func() {
		defer pl.wg.Done()
		pl.run(p, ref, ep)
	}()
	return p, nil
}

// errShutdown ends a pull the worker's stop interrupts: its record keeps
// its state, and the next start of the worker resumes it.
var errShutdown = errors.New("the worker is stopping; the pull resumes when it starts again")

// run is one pull, from the delta request to the last frame.
func (pl *Puller) run(p *Job, ref Ref, ep Endpoint) {
	if !p.cri {
		// Recorded from the start, so that a pull the worker's stop
		// interrupts before the registry answered starts again.
		pl.save(p)
	}
	pl.finishRun(p, ref, func(ctx context.Context) error {
		return pl.pull(ctx, p, ref, ep, time.Now())
	})
}

// finishRun runs a pull (pull or a resumed one) and records how it ended.
func (pl *Puller) finishRun(p *Job, ref Ref, body func(ctx context.Context) error) {
	ctx := log.WithLogger(pl.ctx, log.G(pl.ctx).WithField("ref", ref.Name))
	img, _ := p.Snapshot()
	ctx = namespaces.WithNamespace(ctx, img.Namespace)

	err := body(ctx)
	if p.header != nil {
		p.header(err) // no-op once the header was signalled
	}
	stopped := errors.Is(err, errShutdown) && pl.ctx.Err() != nil
	p.update(func(img *api.WorkerImage) {
		p.active = false
		if err != nil && !stopped {
			img.State = api.PullFailed
			img.Error = err.Error()
		}
	})
	switch {
	case stopped:
		log.G(ctx).Info("pull interrupted by the worker's stop; it resumes at the next start")
	case err != nil:
		log.G(ctx).WithError(err).Error("pull failed")
		pl.metrics.Pulls.WithLabelValues("failed").Inc()
		pl.removeResumable(p)
	default:
		pl.removeResumable(p)
	}
	pl.save(p)
}

func (pl *Puller) pull(ctx context.Context, p *Job, ref Ref, ep Endpoint, start time.Time) error {
	select {
	case pl.sem <- struct{}{}:
	case <-ctx.Done():
		return errShutdown
	}
	defer func() { <-pl.sem }()
	pl.metrics.ActivePulls.Inc()
	defer pl.metrics.ActivePulls.Dec()

	platform := p.platform
	if platform == (api.Platform{}) {
		platform = DefaultPlatform
	}
	rc := pl.client(p, ep)
	if !ep.Starlight {
		log.G(ctx).WithField("registry", ep.Registry.String()).Info("host is not a Starlight registry, falling back to a standard pull")
		md, err := pl.importer.PullPlain(ctx, ref.Normalized, platform.String(), rc.Resolver())
		if err != nil {
			return fmt.Errorf("%s: %w", ref.Name, err)
		}
		now := time.Now().UTC()
		p.update(func(img *api.WorkerImage) {
			img.Digest = md.Target.Digest.String()
			img.State = api.PullComplete
			img.Complete = true
			img.Ready, img.Completed = &now, &now
		})
		pl.metrics.Pulls.WithLabelValues("complete").Inc()
		return nil
	}

	pl.gcLock.RLock()
	gcLocked := true
	unlockGC := func() {
		if gcLocked {
			gcLocked = false
			pl.gcLock.RUnlock()
		}
	}
	defer unlockGC()
	req := api.DeltaRequest{
		Reference:     ref.DeltaReference(),
		Platform:      platform,
		Have:          pl.layers.Inventory(),
		HeaderVersion: bundle.Version,
	}
	log.G(ctx).WithFields(log.Fields{"registry": ep.Registry.String(), "platform": platform, "have": len(req.Have)}).Info("requesting delta bundle")
	body, br, err := pl.openBundle(ctx, p, ref, ep, req)
	if err != nil {
		if ctx.Err() != nil {
			return errShutdown
		}
		return err
	}
	defer func() { body.Close() }()
	h := br.Header()
	headerAt := time.Now()
	plan, err := importer.PlanImage(h)
	if err != nil {
		return fmt.Errorf("%s: %w", ref.Name, err)
	}
	files := countContents(h.Frames)
	var total int64
	for _, f := range h.Frames {
		total += f.CompressedSize
	}
	p.update(func(img *api.WorkerImage) {
		img.State = api.PullImporting
		img.Digest = h.ManifestDigest
		// The image's own platform: a single-platform image is served
		// whatever the request asked, and a CRI pull names none.
		if cp, ok := configPlatform(h.Config); ok {
			img.Platform = cp.String()
		}
		img.Layers = nil
		for _, l := range plan.Layers {
			img.Layers = append(img.Layers, l.String())
		}
		img.BytesTotal, img.FramesTotal, img.FilesTotal = total, len(h.Frames), files
		img.ImageBytes, img.DedupBytes, img.SendBytes = h.Stats.ImageBytes, h.Stats.DedupBytes, h.Stats.SendBytes
	})
	pl.metrics.ImageBytes.Add(float64(h.Stats.ImageBytes))
	pl.metrics.DedupBytes.Add(float64(h.Stats.DedupBytes))

	// Trees and expected contents first, so that a read through a layer
	// mounted from here on blocks until its content arrives.
	for i := range h.Layers {
		if err := pl.layers.Add(&h.Layers[i]); err != nil {
			return fmt.Errorf("%s: %w", ref.Name, err)
		}
	}
	if err := pl.store.ExpectHeader(h); err != nil {
		return fmt.Errorf("%s: %w", ref.Name, err)
	}
	var stream *demand.Stream
	if pl.demand != nil {
		stream = pl.demand.Add(rc, ref.Host, ref.Repository, h)
		defer stream.Close()
	}
	// What a restarted worker needs to resume this pull, before anything
	// can read through its layers.
	if err := pl.saveResumable(p, req, h); err != nil {
		log.G(ctx).WithError(err).Warn("this pull will not resume after a restart of the worker")
	}
	pl.save(p)
	// The image record names the layers now: they and their contents
	// are safe from the collector.
	unlockGC()
	treesAt := time.Now()
	if p.cri {
		// containerd is unpacking the image: the Prepare that waits
		// can now resolve its layer, and the others find theirs.
		p.header(nil)
	} else if err := pl.importer.Import(ctx, ref.Name, plan); err != nil {
		if ctx.Err() != nil {
			return errShutdown
		}
		err = fmt.Errorf("%s: %w", ref.Name, err)
		pl.failFrames(h.Frames, err)
		return err
	}
	ready := time.Now().UTC()
	p.update(func(img *api.WorkerImage) {
		img.State = api.PullReady
		img.Ready = &ready
	})
	pl.metrics.Pulls.WithLabelValues("ready").Inc()
	pl.metrics.PullSeconds.WithLabelValues("ready").Observe(time.Since(start).Seconds())
	log.G(ctx).WithFields(log.Fields{
		"digest": h.ManifestDigest, "frames": len(h.Frames), "bytes": total, "dedupBytes": h.Stats.DedupBytes,
		// Where the time to ready went: the registry's answer (round
		// trip, planning, header), recording the trees, the import
		// into containerd (snapshots, FUSE mounts).
		"headerSeconds": headerAt.Sub(start).Seconds(),
		"treesSeconds":  treesAt.Sub(headerAt).Seconds(),
		"importSeconds": ready.Sub(treesAt).Seconds(),
	}).Info("image ready, receiving contents")
	pl.save(p)

	if err := pl.receive(ctx, p, ref, ep, req, h.Frames, br, &body, stream, 0); err != nil {
		return err
	}
	return pl.complete(ctx, p, ref, h, start)
}

// complete records the end of a pull whose stream was received whole.
func (pl *Puller) complete(ctx context.Context, p *Job, ref Ref, h *api.BundleHeader, start time.Time) error {
	complete := true
	for i := range h.Layers {
		ok, err := pl.layers.CheckComplete(&h.Layers[i])
		if err != nil {
			return fmt.Errorf("%s: %w", ref.Name, err)
		}
		complete = complete && ok
	}
	completed := time.Now().UTC()
	p.update(func(img *api.WorkerImage) {
		img.Complete = complete
		img.Completed = &completed
		img.State = api.PullComplete
		if !complete {
			// The registry left out contents of layers this worker
			// claimed to hold, and they are gone from the store.
			img.Error = "some contents the registry did not send are missing from the store"
		}
	})
	pl.metrics.Pulls.WithLabelValues("complete").Inc()
	pl.metrics.PullSeconds.WithLabelValues("complete").Observe(time.Since(start).Seconds())
	log.G(ctx).WithField("seconds", time.Since(start).Seconds()).Info("image complete")
	return nil
}

// openBundle sends the delta request and reads the bundle header. A
// stream that breaks before its header is complete is asked for again,
// as receive resumes one that breaks later; any other failure (an error
// answer, a header the reader refuses) ends the pull at once.
func (pl *Puller) openBundle(ctx context.Context, p *Job, ref Ref, ep Endpoint, req api.DeltaRequest) (io.ReadCloser, *bundle.Reader, error) {
	var r retrier
	for {
		body, err := pl.client(p, ep).Delta(ctx, ref.Host, ref.Repository, req)
		if err != nil && r.failures == 0 {
			return nil, nil, fmt.Errorf("%s: %w", ref.Name, err)
		}
		if err == nil {
			br, rerr := bundle.NewReaderLimits(body, pl.limits)
			if rerr == nil {
				return body, br, nil
			}
			body.Close()
			err = rerr
			if !errors.Is(err, bundle.ErrTruncated) {
				return nil, nil, fmt.Errorf("%s: reading bundle: %w", ref.Name, err)
			}
		}
		if !pl.retry(ctx, p, &r, false, err, 0) {
			return nil, nil, fmt.Errorf("%s: reading bundle: %w", ref.Name, err)
		}
	}
}

// retrier counts the attempts of one pull that delivered nothing.
type retrier struct {
	// failures is how many attempts in a row brought no frame.
	failures int
}

// retry decides whether to ask the registry again after an attempt that
// failed with err, and waits before it does. A stream that brought frames
// before it broke is resumed at once: the registry was answering, and the
// connection is what failed. Attempts that bring nothing count, and wait
// the backoff, doubling, up to 30s; after cfg.PullRetries of them in a row
// (or at once, with pull_retries = 0) the pull gives up, as it does when
// ctx is done.
func (pl *Puller) retry(ctx context.Context, p *Job, r *retrier, progressed bool, err error, resume int) bool {
	if ctx.Err() != nil || pl.cfg.PullRetries == 0 {
		return false
	}
	wait := time.Duration(0)
	if progressed {
		r.failures = 0
	} else {
		r.failures++
		if r.failures > pl.cfg.PullRetries {
			return false
		}
		wait = min(pl.backoff<<min(r.failures-1, 16), 30*time.Second)
	}
	log.G(ctx).WithError(err).WithField("resume", resume).WithField("retryIn", wait).Warn("bundle stream broke, resuming")
	if wait > 0 {
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return false
		}
	}
	pl.metrics.Resumes.Inc()
	p.update(func(img *api.WorkerImage) { img.Resumes++ })
	pl.save(p) // the count survives a crash too
	return true
}

// receive stores the frames of the bundle, resuming a broken stream with
// the same request (same Have, so the same frame order); see retry for
// how often. When it gives up, when the store cannot write (a full disk),
// or when a content fails its verification as a whole (asking again would
// not help either), the contents still missing fail, so blocked reads
// return EIO instead of hanging. br is the stream the request opened; nil
// for a pull resumed after a restart of the worker, which asks at once for
// the stream from frame from.
func (pl *Puller) receive(ctx context.Context, p *Job, ref Ref, ep Endpoint, req api.DeltaRequest, frames []api.Frame,
	br *bundle.Reader, body *io.ReadCloser, stream *demand.Stream, from int) error {
	last := store.Progress{Frames: from}
	var countedBytes int64
	countedFrames := from
	img, _ := p.Snapshot()
	filesBase := img.FilesReceived
	if br != nil {
		countedFrames, filesBase = br.Header().Resume, 0
		last.Frames = countedFrames
	}
	restarted := br == nil
	progress := func(sp store.Progress) {
		last = sp
		if stream != nil {
			stream.Received(sp.Bytes)
		}
		if d := sp.Bytes - countedBytes; d > 0 && sp.Frames > countedFrames {
			pl.metrics.BytesReceived.Add(float64(d))
			pl.metrics.FramesReceived.Add(float64(sp.Frames - countedFrames))
		}
		countedBytes, countedFrames = sp.Bytes, sp.Frames
		p.update(func(img *api.WorkerImage) {
			img.BytesReceived, img.FramesReceived = sp.Bytes, sp.Frames
			img.FilesReceived = filesBase + sp.Contents
		})
	}
	var (
		err error
		r   retrier
	)
	for {
		progressed := false
		if br != nil {
			start := last.Frames
			err = pl.store.Receive(ctx, br, progress)
			(*body).Close()
			if err == nil {
				return nil
			}
			filesBase += last.Contents
			last.Contents = 0
			progressed = last.Frames > start
			// Asking again does not help a disk that cannot be
			// written, nor a content whose verified chunks do not
			// make up its digest: the registry would send the same.
			if errors.Is(err, store.ErrStorage) || errors.Is(err, store.ErrFailed) {
				break
			}
		}
		if ctx.Err() != nil {
			return errShutdown
		}
		if restarted {
			// The first request of a pull a restart interrupted.
			restarted = false
			log.G(ctx).WithField("resume", last.Frames).Info("resuming the bundle stream the worker's restart interrupted")
			pl.metrics.Resumes.Inc()
			p.update(func(img *api.WorkerImage) { img.Resumes++ })
			pl.save(p)
		} else if !pl.retry(ctx, p, &r, progressed, err, last.Frames) {
			if ctx.Err() != nil {
				return errShutdown
			}
			break
		}
		req.Resume = last.Frames
		br = nil
		*body, err = pl.client(p, ep).Delta(ctx, ref.Host, ref.Repository, req)
		if err != nil {
			continue
		}
		nbr, nerr := bundle.NewReaderLimits(*body, pl.limits)
		if nerr != nil {
			(*body).Close()
			err = nerr
			continue
		}
		if nbr.Header().Resume != req.Resume || !reflect.DeepEqual(nbr.Header().Frames, frames) {
			(*body).Close()
			err = errors.New("the registry answered the resumed request with another bundle (was the image re-pushed?)")
			break
		}
		br = nbr
	}
	err = fmt.Errorf("%s: receiving contents: %w", ref.Name, err)
	pl.failFrames(frames[last.Frames:], err)
	return err
}

// failFrames fails the contents of frames that will not arrive, so that
// reads blocked on them return EIO. Unlike store.FailPending it leaves
// alone the contents other pulls, running at the same time, still bring.
// A later pull expecting them again re-arms them.
func (pl *Puller) failFrames(frames []api.Frame, err error) {
	for _, f := range frames {
		pl.store.Fail(digest.Digest(f.Digest), err)
	}
}

func countContents(frames []api.Frame) int {
	seen := make(map[string]bool)
	for _, f := range frames {
		seen[f.Digest] = true
	}
	return len(seen)
}

func (pl *Puller) recordPath(namespace, ref string) string {
	sum := sha256.Sum256([]byte(imageKey(namespace, ref)))
	return filepath.Join(pl.recordDir, hex.EncodeToString(sum[:])+".json")
}

// save writes the image record.
func (pl *Puller) save(p *Job) {
	img, _ := p.Snapshot()
	path := pl.recordPath(img.Namespace, img.Ref)
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if pl.pulls[imageKey(img.Namespace, img.Ref)] != p {
		return // removed meanwhile
	}
	b, err := json.Marshal(img)
	if err == nil {
		err = continuity.AtomicWriteFile(path, b, 0o600)
	}
	if err != nil {
		log.G(pl.ctx).WithError(err).WithField("ref", img.Ref).Warn("saving image record")
	}
}

// FindImage returns the image a container's rootfs was made from: the
// image named ref in namespace when ref is given (the label ctr-starlight
// create sets), else the image whose layers (base first) are exactly
// layers, the most recently pulled if several are.
func (pl *Puller) FindImage(namespace, ref string, layers []digest.Digest) (api.WorkerImage, bool) {
	var (
		best  api.WorkerImage
		found bool
	)
	for _, img := range pl.Images() {
		if namespace != "" && img.Namespace != namespace || img.Digest == "" || len(img.Layers) == 0 {
			continue
		}
		if ref != "" {
			if img.Ref == ref {
				return img, true
			}
			continue
		}
		if len(img.Layers) != len(layers) {
			continue
		}
		same := true
		for i, l := range img.Layers {
			same = same && l == layers[i].String()
		}
		if same && (!found || img.Started.After(best.Started)) {
			best, found = img, true
		}
	}
	return best, found
}

// UsedLayers returns the layers that image records name.
func (pl *Puller) UsedLayers() map[digest.Digest]bool {
	used := make(map[digest.Digest]bool)
	for _, img := range pl.Images() {
		for _, l := range img.Layers {
			used[digest.Digest(l)] = true
		}
	}
	return used
}

// forgetGrace is how long a finished pull's record stays although
// containerd has no image of its name: a CRI pull's contents may all
// arrive before containerd, still unpacking, creates the image.
const forgetGrace = 10 * time.Second

// ForgetDeleted drops the records of the images containerd deleted
// (`ctr image rm`, `crictl rmi`, kubelet's image garbage collection), so
// that their layers and contents become garbage once no snapshot uses them:
// the worker follows containerd. Records of running pulls, of pulls that
// ended less than forgetGrace ago, and every record while containerd
// cannot be asked, stay. It returns the refs forgotten.
func (pl *Puller) ForgetDeleted(ctx context.Context) ([]string, error) {
	pl.mu.Lock()
	jobs := make(map[string]*Job, len(pl.pulls))
	for k, p := range pl.pulls {
		jobs[k] = p
	}
	pl.mu.Unlock()
	var forgotten []string
	for key, p := range jobs {
		img, _ := p.Snapshot()
		p.mu.Lock()
		active := p.active
		p.mu.Unlock()
		end := img.Started
		if img.Completed != nil {
			end = *img.Completed
		}
		if active || time.Since(end) < forgetGrace {
			continue
		}
		exists, err := pl.importer.Exists(namespaces.WithNamespace(ctx, img.Namespace), img.Ref)
		if err != nil {
			return forgotten, err
		}
		if exists {
			continue
		}
		pl.mu.Lock()
		if pl.pulls[key] != p {
			pl.mu.Unlock()
			continue
		}
		delete(pl.pulls, key)
		pl.mu.Unlock()
		if err := os.Remove(pl.recordPath(img.Namespace, img.Ref)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return forgotten, fmt.Errorf("removing the record of %s: %w", img.Ref, err)
		}
		log.G(ctx).WithFields(log.Fields{"ref": img.Ref, "namespace": img.Namespace}).
			Info("containerd deleted the image: its layers are garbage once no snapshot uses them")
		forgotten = append(forgotten, img.Ref)
	}
	return forgotten, nil
}

// ErrImageNotFound is returned by Remove for an image the worker and
// containerd do not know.
var ErrImageNotFound = errors.New("image not found")

// Remove removes the image ref of namespace: its record, and the image in
// containerd (waiting for containerd's garbage collector, so that the
// snapshots only it used are gone when Remove returns).
func (pl *Puller) Remove(ctx context.Context, ref, namespace string) error {
	if namespace == "" {
		namespace = namespaces.Default
	}
	if err := identifiers.Validate(namespace); err != nil {
		return fmt.Errorf("invalid namespace: %w", err)
	}
	key := imageKey(namespace, ref)
	pl.mu.Lock()
	p, known := pl.pulls[key]
	if known {
		p.mu.Lock()
		active := p.active
		p.mu.Unlock()
		if active {
			pl.mu.Unlock()
			return fmt.Errorf("%s is being pulled; wait for the pull to end", ref)
		}
	}
	pl.mu.Unlock()

	inContainerd, err := pl.importer.Delete(namespaces.WithNamespace(ctx, namespace), ref)
	if err != nil {
		return err
	}
	if !known && !inContainerd {
		return fmt.Errorf("%w: %s (namespace %s)", ErrImageNotFound, ref, namespace)
	}
	if known {
		pl.mu.Lock()
		if pl.pulls[key] == p {
			delete(pl.pulls, key)
		}
		pl.mu.Unlock()
		if err := os.Remove(pl.recordPath(namespace, ref)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("removing the record of %s: %w", ref, err)
		}
	}
	return nil
}

// BlockPulls waits until no pull is between announcing the layers it holds
// and recording the layers it receives, and keeps pulls from entering that
// step until unblock is called: the garbage collector's lock.
func (pl *Puller) BlockPulls() (unblock func()) {
	pl.gcLock.Lock()
	return pl.gcLock.Unlock
}

// client is the registry client for the pull p from ep.
func (pl *Puller) client(p *Job, ep Endpoint) *remote.Client {
	rc := pl.remote
	if p.remote != nil {
		rc = p.remote
	}
	if ep.Registry.PlainHTTP {
		return rc.WithPlainHTTP()
	}
	return rc
}

// userSource names PullRequest.User in errors.
const userSource = "--user"

// userCredentials are the credentials of PullRequest.User ("user:password",
// or "user" alone as ctr takes it) for every host of the pull.
func userCredentials(user string) remote.CredentialFunc {
	name, secret, _ := strings.Cut(user, ":")
	return func(string) (remote.Credential, error) {
		return remote.Credential{Username: name, Secret: secret, Source: userSource}, nil
	}
}
