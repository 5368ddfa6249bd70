// Package tracer records the startup traces of containers (the
// snapshotter's Tracer) on private FUSE views of their layers, keeps them
// on disk until they are reported, and reports them to the registries.
package tracer

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/continuity"
	"github.com/containerd/log"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/remote"
	"github.com/starlight-project/starlight/worker/config"
	"github.com/starlight-project/starlight/worker/fs"
	"github.com/starlight-project/starlight/worker/layers"
	"github.com/starlight-project/starlight/worker/snapshotter"
	"github.com/starlight-project/starlight/worker/store"
	"github.com/starlight-project/starlight/worker/trace"
)

// DefaultCheckpointInterval is how often the traces of running containers
// are written to disk, so that a worker crash loses at most that much.
const DefaultCheckpointInterval = time.Minute

// Tracer records the startup traces of containers (the snapshotter's
// Tracer) and keeps them until they are reported. Under root:
//
//	optimize.json   the optimize mode ({"on": true}), kept across restarts
//	pending/        one JSON file per trace not yet reported (trace.Trace)
//	mnt/<key>/<layer>  the private FUSE views of traced containers
//
// A traced container's rootfs stacks private views of its image's layers:
// the same trees and content store as the shared views, but mounted for
// that container alone, without passthrough, with hooks bound to its
// recorder, so every access recorded is the container's own.
type Tracer struct {
	root   string
	dir    *trace.Dir
	cfg    *config.Config
	layers *layers.Registry
	store  *store.Store
	remote *remote.Client
	// reportClient makes the client of a report to another registry
	// (--server); see WithReportClient.
	reportClient func(server config.Registry) *remote.Client
	worker       string // reported as the trace's worker
	images       ImageFinder

	mu       sync.Mutex
	on       bool
	sessions map[string]*session
	// reportMu serialises reports, so that a trace is uploaded once.
	reportMu sync.Mutex
}

// ImageFinder finds the image a container's rootfs was made from: the
// image named ref in namespace when ref is given, else the image whose
// layers (base first) are exactly layers (the puller).
type ImageFinder interface {
	FindImage(namespace, ref string, layers []digest.Digest) (api.WorkerImage, bool)
}

// session is the trace of one traced snapshot.
type session struct {
	key string
	dir string // its private mount points live here
	rec *trace.Recorder
	t   trace.Trace // everything but the accesses
	// untraced is set when no image could be found for the snapshot:
	// it stacks the shared views.
	untraced bool

	mu     sync.Mutex // serialises mounts and saves
	calls  int
	mounts map[digest.Digest]*fs.MountedLayer
	saved  uint64 // recorder version last written
	// reported is set when a report sealed and wrote this trace: the
	// container's later accesses are past its startup.
	reported bool
}

var _ snapshotter.Tracer = (*Tracer)(nil)

// Option changes how New builds the Tracer.
type Option func(*Tracer)

// WithReportClient sets how the client of a report to another registry
// (--server) is made: from server's scheme and credentials, plus whatever
// else the worker knows of registry hosts (its host configuration). The
// default uses server's settings alone.
func WithReportClient(f func(server config.Registry) *remote.Client) Option {
	return func(t *Tracer) { t.reportClient = f }
}

// serverClient is the default report client: server's scheme and
// credentials alone.
func serverClient(server config.Registry) *remote.Client {
	hc := remote.HostConfig{PlainHTTP: server.PlainHTTP, Username: server.Username, Password: server.Password}
	return remote.New(remote.Options{UserAgent: "starlight-worker",
		Hosts: remote.StaticHosts(func(string) remote.HostConfig { return hc })})
}

// optimizeFile is the persisted optimize mode.
const optimizeFile = "optimize.json"

// New opens the trace state under root. cfg names the registries traces
// are reported to (and their credentials); images attributes containers to
// the images they run.
func New(root string, cfg *config.Config, l *layers.Registry, st *store.Store, rc *remote.Client, images ImageFinder, opts ...Option) (*Tracer, error) {
	dir, err := trace.OpenDir(filepath.Join(root, "pending"))
	if err != nil {
		return nil, err
	}
	t := &Tracer{root: root, dir: dir, cfg: cfg, layers: l, store: st, remote: rc, images: images,
		reportClient: serverClient, sessions: make(map[string]*session)}
	for _, opt := range opts {
		opt(t)
	}
	t.worker, _ = os.Hostname()
	b, err := os.ReadFile(filepath.Join(root, optimizeFile))
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("reading optimize mode: %w", err)
	default:
		var st api.OptimizeState
		if err := json.Unmarshal(b, &st); err != nil {
			return nil, fmt.Errorf("reading optimize mode: %s: %w", filepath.Join(root, optimizeFile), err)
		}
		t.on = st.On
	}
	return t, nil
}

// Optimize reports whether every new container is traced.
func (t *Tracer) Optimize() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.on
}

// SetOptimize turns tracing of every new container on or off and
// persists the mode. Containers already created keep their mode.
func (t *Tracer) SetOptimize(on bool) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	b, err := json.Marshal(api.OptimizeState{On: on})
	if err == nil {
		err = continuity.AtomicWriteFile(filepath.Join(t.root, optimizeFile), b, 0o600)
	}
	if err != nil {
		return fmt.Errorf("saving optimize mode: %w", err)
	}
	t.on = on
	return nil
}

// splitKey splits a snapshot key as containerd's metadata layer names
// backend snapshots, "<namespace>/<n>/<key>", into the namespace and the
// caller's key (the container ID for ctr and ctr-starlight create).
func splitKey(key string) (namespace, name string) {
	parts := strings.SplitN(key, "/", 3)
	if len(parts) == 3 {
		return parts[0], parts[2]
	}
	return "", key
}

// baseFirst returns the chain-ordered (nearest first) layers base first,
// the order of an image's layers.
func baseFirst(layers []digest.Digest) []digest.Digest {
	out := slices.Clone(layers)
	slices.Reverse(out)
	return out
}

// Trace implements snapshotter.Tracer: a snapshot is traced when its
// labels ask for it (api.LabelOptimize), or in optimize mode unless
// they refuse it, and only if the worker knows the image, since a trace
// nobody can attribute cannot be reported.
func (t *Tracer) Trace(ctx context.Context, key string, labels map[string]string, layers []digest.Digest) bool {
	switch labels[api.LabelOptimize] {
	case "true":
	case "false":
		return false
	default:
		if !t.Optimize() {
			return false
		}
	}
	ns, _ := splitKey(key)
	if _, ok := t.images.FindImage(ns, labels[api.LabelImageRef], baseFirst(layers)); !ok {
		log.G(ctx).WithField("key", key).Warn("not tracing: no image pulled through this worker has these layers")
		return false
	}
	return true
}

// TracedDirs implements snapshotter.Tracer: it starts the snapshot's
// trace at its first call (the rootfs is prepared) and mounts its private
// views; a later call (the rootfs is mounted for the task) restarts the
// trace clock if nothing was read yet.
func (t *Tracer) TracedDirs(ctx context.Context, key string, labels map[string]string, layers []digest.Digest) ([]string, error) {
	now := time.Now()
	s := t.session(ctx, key, labels, layers, now)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls++
	if s.calls > 1 {
		s.rec.Restart(now)
	}
	dirs := make([]string, len(layers))
	for i, d := range layers {
		if s.untraced {
			// Safe without the snapshotter's layer lock: this
			// snapshot's parents keep the layer from being released.
			dir, err := t.layers.Dir(ctx, d)
			if err != nil {
				return nil, err
			}
			dirs[i] = dir
			continue
		}
		dir, err := t.mountPrivate(s, d)
		if err != nil {
			return nil, err
		}
		dirs[i] = dir
	}
	return dirs, nil
}

// session returns the session of key, starting it if needed.
func (t *Tracer) session(ctx context.Context, key string, labels map[string]string, layers []digest.Digest, now time.Time) *session {
	t.mu.Lock()
	defer t.mu.Unlock()
	if s, ok := t.sessions[key]; ok {
		return s
	}
	sum := sha256.Sum256([]byte(key))
	s := &session{
		key:    key,
		dir:    filepath.Join(t.root, "mnt", hex.EncodeToString(sum[:16])),
		rec:    trace.NewRecorder(now),
		mounts: make(map[digest.Digest]*fs.MountedLayer),
	}
	ns, name := splitKey(key)
	var (
		img api.WorkerImage
		ok  bool
	)
	img, ok = t.images.FindImage(ns, labels[api.LabelImageRef], baseFirst(layers))
	if !ok {
		// Known at Trace time; the image record went away since (or the
		// worker restarted without it).
		log.G(ctx).WithField("key", key).Warn("image of a traced container is unknown; not tracing it")
		s.untraced = true
	} else {
		var host, repository string
		if named, err := reference.ParseNormalizedNamed(img.Ref); err == nil {
			host, repository = reference.Domain(named), reference.Path(named)
		}
		s.t = trace.Trace{
			ID: trace.NewID(now), Ref: img.Ref, Registry: host, PlainHTTP: img.PlainHTTP,
			Report: api.TraceReport{
				Repository: repository, ManifestDigest: img.Digest,
				Worker: t.worker, Container: name, StartedAt: now.UTC(),
			},
		}
		log.G(ctx).WithFields(log.Fields{"container": name, "image": img.Ref, "trace": s.t.ID}).Info("tracing container")
	}
	t.sessions[key] = s
	return s
}

// mountPrivate mounts the session's own view of layer d. s.mu is held.
func (t *Tracer) mountPrivate(s *session, d digest.Digest) (string, error) {
	mnt := filepath.Join(s.dir, d.Encoded())
	if _, ok := s.mounts[d]; ok {
		return mnt, nil
	}
	tree, err := t.layers.ReadTree(d)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return "", fmt.Errorf("traced view of %s: %w", d, err)
	}
	_ = syscall.Unmount(mnt, syscall.MNT_DETACH) // left by a crashed worker
	onOpen, onRead := s.rec.Hooks(trace.NewLayer(tree))
	m, err := fs.Mount(mnt, *tree, fs.Options{Store: t.store, OnOpen: onOpen, OnRead: onRead, NoPassthrough: true})
	if err != nil {
		return "", fmt.Errorf("traced view of %s: %w", d, err)
	}
	s.mounts[d] = m
	return mnt, nil
}

// Untrace implements snapshotter.Tracer: the container is gone, its
// trace is written (unless a report took it already) and its views are
// unmounted.
func (t *Tracer) Untrace(ctx context.Context, key string) {
	t.mu.Lock()
	s, ok := t.sessions[key]
	delete(t.sessions, key)
	t.mu.Unlock()
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if snap := s.rec.Seal(); !s.untraced && !s.reported && len(snap.Accesses) > 0 {
		// A container that never ran read nothing: no trace.
		if err := t.save(s, snap, false); err != nil {
			log.G(ctx).WithError(err).WithField("trace", s.t.ID).Error("saving trace")
		} else {
			log.G(ctx).WithField("container", s.t.Report.Container).WithField("trace", s.t.ID).Info("trace recorded")
		}
	}
	t.unmount(ctx, s)
}

func (t *Tracer) unmount(ctx context.Context, s *session) {
	for d, m := range s.mounts {
		if err := m.Unmount(); err != nil {
			log.G(ctx).WithError(err).WithField("layer", d).Warn("unmounting traced view")
		}
		delete(s.mounts, d)
	}
	if err := os.RemoveAll(s.dir); err != nil {
		log.G(ctx).WithError(err).WithField("path", s.dir).Warn("removing traced views")
	}
}

// save writes what s recorded as a pending trace. s.mu is held.
func (t *Tracer) save(s *session, snap trace.Snapshot, partial bool) error {
	tr := s.t
	tr.Partial = partial
	tr.Dropped = snap.Dropped
	tr.Report.StartedAt = snap.Start.UTC()
	tr.Report.Accesses = snap.Accesses
	if tr.Report.Accesses == nil {
		tr.Report.Accesses = []api.TraceAccess{}
	}
	if err := t.dir.Save(&tr); err != nil {
		return err
	}
	s.saved = snap.Version
	return nil
}

// live returns the sessions that record.
func (t *Tracer) live() []*session {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []*session
	for _, s := range t.sessions {
		if !s.untraced {
			out = append(out, s)
		}
	}
	return out
}

// Active counts the containers being traced now.
func (t *Tracer) Active() int { return len(t.live()) }

// Checkpoint writes the traces of running containers that grew since they
// were last written (partial traces).
func (t *Tracer) Checkpoint(ctx context.Context) {
	for _, s := range t.live() {
		s.mu.Lock()
		if snap := s.rec.Snapshot(); !s.reported && snap.Version != s.saved {
			if err := t.save(s, snap, true); err != nil {
				log.G(ctx).WithError(err).WithField("trace", s.t.ID).Warn("checkpointing trace")
			}
		}
		s.mu.Unlock()
	}
}

// Run checkpoints every DefaultCheckpointInterval until ctx is done, then once
// more, and unmounts the private views (their containers cannot outlive
// the worker that serves them).
func (t *Tracer) Run(ctx context.Context) {
	tick := time.NewTicker(DefaultCheckpointInterval)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			t.Checkpoint(ctx)
		case <-ctx.Done():
			t.Checkpoint(context.WithoutCancel(ctx))
			return
		}
	}
}

// Close unmounts every private view.
func (t *Tracer) Close(ctx context.Context) {
	t.mu.Lock()
	sessions := make([]*session, 0, len(t.sessions))
	for _, s := range t.sessions {
		sessions = append(sessions, s)
	}
	t.mu.Unlock()
	for _, s := range sessions {
		s.mu.Lock()
		t.unmount(ctx, s)
		s.mu.Unlock()
	}
}

// summary describes a trace for the API.
func summary(tr *trace.Trace, recording bool) api.TraceSummary {
	files := make(map[[2]string]bool)
	for _, a := range tr.Report.Accesses {
		files[[2]string{a.Layer, a.Name}] = true
	}
	return api.TraceSummary{
		ID: tr.ID, Ref: tr.Ref, Registry: tr.Registry,
		Repository: tr.Report.Repository, ManifestDigest: tr.Report.ManifestDigest,
		Container: tr.Report.Container, StartedAt: tr.Report.StartedAt,
		Accesses: len(tr.Report.Accesses), Files: len(files),
		Recording: recording, Partial: tr.Partial,
	}
}

// List returns the traces not yet reported: those on disk, and those of
// running containers (Recording), oldest first.
func (t *Tracer) List(ctx context.Context) ([]api.TraceSummary, error) {
	onDisk, err := t.dir.List()
	if err != nil {
		log.G(ctx).WithError(err).Warn("listing traces")
	}
	byID := make(map[string]api.TraceSummary)
	for _, tr := range onDisk {
		byID[tr.ID] = summary(tr, false)
	}
	for _, s := range t.live() {
		s.mu.Lock()
		if snap := s.rec.Snapshot(); !s.reported && len(snap.Accesses) > 0 {
			tr := s.t
			tr.Report.Accesses, tr.Report.StartedAt = snap.Accesses, snap.Start.UTC()
			tr.Partial = true
			byID[tr.ID] = summary(&tr, true)
		}
		s.mu.Unlock()
	}
	out := make([]api.TraceSummary, 0, len(byID))
	for _, tr := range byID {
		out = append(out, tr)
	}
	slices.SortFunc(out, func(a, b api.TraceSummary) int {
		if c := a.StartedAt.Compare(b.StartedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, nil
}

// Report uploads every trace not yet reported. The traces of running
// containers are sealed first: their recording stops there (the startup
// is what a trace is for, and a run is reported once) and they are written
// as partial traces. A trace leaves the disk after the registry accepted
// it (201, or 200 for a report it already had); a failure is recorded in
// the result, verbatim, and the trace stays for the next report. server,
// if not empty, overrides the registry of every trace.
func (t *Tracer) Report(ctx context.Context, server string) (*api.ReportResult, error) {
	var override *reportTarget
	if server != "" {
		reg, err := config.ParseRegistryURL(server)
		if err != nil {
			return nil, fmt.Errorf("--server: %w", err)
		}
		if reg.Username == "" {
			if known, ok := t.cfg.Registry(reg.Host); ok {
				reg.Username, reg.Password = known.Username, known.Password
			}
		}
		// One client for the whole report: its connections and token
		// serve every trace.
		override = &reportTarget{reg: reg, client: t.reportClient(reg)}
	}
	t.reportMu.Lock()
	defer t.reportMu.Unlock()
	for _, s := range t.live() {
		s.mu.Lock()
		// A container that has not started yet keeps recording: its
		// startup is still to come.
		if !s.reported && len(s.rec.Snapshot().Accesses) > 0 {
			if err := t.save(s, s.rec.Seal(), true); err != nil {
				log.G(ctx).WithError(err).WithField("trace", s.t.ID).Error("saving trace for the report")
			} else {
				s.reported = true
			}
		}
		s.mu.Unlock()
	}
	traces, err := t.dir.List()
	if err != nil {
		log.G(ctx).WithError(err).Warn("listing traces")
	}
	res := &api.ReportResult{Traces: []api.TraceUpload{}}
	for _, tr := range traces {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		res.Traces = append(res.Traces, t.upload(ctx, tr, override))
	}
	return res, nil
}

// reportTarget is the registry a report sends every trace to (--server),
// and the client with its credentials.
type reportTarget struct {
	reg    config.Registry
	client *remote.Client
}

// upload posts one trace and deletes it once the registry has it.
func (t *Tracer) upload(ctx context.Context, tr *trace.Trace, override *reportTarget) api.TraceUpload {
	up := api.TraceUpload{TraceSummary: summary(tr, false)}
	rc := t.remote
	reg := config.Registry{Host: tr.Registry, PlainHTTP: tr.PlainHTTP}
	switch {
	case override != nil:
		// Another registry than the image's, with its own credentials.
		reg, rc = override.reg, override.client
	default:
		if known, ok := t.cfg.Registry(tr.Registry); ok {
			reg.PlainHTTP = reg.PlainHTTP || known.PlainHTTP
		}
		if reg.PlainHTTP {
			rc = rc.WithPlainHTTP()
		}
	}
	up.URL = reg.BaseURL() + remote.TracesPath
	if reg.Host == "" {
		up.Error = "the trace names no registry; report it with --server URL"
		return up
	}
	r, err := rc.PostTrace(ctx, reg.Host, &tr.Report)
	if err != nil {
		up.Error = err.Error()
		log.G(ctx).WithError(err).WithField("trace", tr.ID).WithField("url", up.URL).Warn("reporting trace")
		return up
	}
	up.ReportID, up.Accepted, up.Existing = r.ID, r.Accepted, r.Existing
	if err := t.dir.Remove(tr.ID); err != nil {
		log.G(ctx).WithError(err).WithField("trace", tr.ID).Warn("removing reported trace")
	}
	log.G(ctx).WithFields(log.Fields{"trace": tr.ID, "url": up.URL, "accepted": r.Accepted}).Info("trace reported")
	return up
}
