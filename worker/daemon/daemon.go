// Package daemon is the heart of starlight-worker: it pulls images through
// Starlight registries (one delta bundle per image), keeps the registry of
// converted layers the snapshotter mounts, and serves the containerd
// snapshotter API, the worker API and metrics.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"

	"github.com/starlight-project/starlight/worker/config"
	"github.com/starlight-project/starlight/worker/snapshotter"
	"github.com/starlight-project/starlight/worker/store"
)

// Daemon is a running worker's state.
type Daemon struct {
	cfg         *config.Config
	Store       *store.Store
	Layers      *Layers
	Snapshotter snapshots.Snapshotter
	Puller      *Puller
	Metrics     *Metrics
	Tracing     *Tracing
	Collector   *Collector
}

// New opens the worker's state under cfg.Root: the content store
// (store/), the layer registry (layers/), the snapshotter (snapshots/),
// the image records (images/) and the traces (traces/). It remounts the
// known layers, so that snapshots made before a restart work again.
func New(ctx context.Context, cfg *config.Config) (*Daemon, error) {
	if err := os.MkdirAll(cfg.Root, 0o711); err != nil {
		return nil, fmt.Errorf("creating root: %w", err)
	}
	st, err := store.Open(filepath.Join(cfg.Root, "store"))
	if err != nil {
		return nil, err
	}
	layers, err := OpenLayers(ctx, filepath.Join(cfg.Root, "layers"), st, FUSEMounter(st, nil))
	if err != nil {
		return nil, err
	}
	remote := NewRemote()
	tracing, err := NewTracing(filepath.Join(cfg.Root, "traces"), cfg, layers, st, remote)
	if err != nil {
		return nil, err
	}
	sn, err := snapshotter.New(filepath.Join(cfg.Root, "snapshots"), layers, snapshotter.WithTracer(tracing))
	if err != nil {
		return nil, fmt.Errorf("opening snapshotter: %w", err)
	}
	metrics := NewMetrics(func() float64 { return float64(st.Pending()) })
	puller, err := NewPuller(cfg, st, layers, remote, metrics, filepath.Join(cfg.Root, "images"))
	if err != nil {
		sn.Close()
		return nil, err
	}
	tracing.images = puller
	collector := NewCollector(layers, st, sn, puller)
	layers.OnRelease = func(digest.Digest) { collector.Trigger() }
	// A CRI pull of an image the worker does not know yet fetches it.
	layers.Fetcher = puller
	layers.MountAll(ctx)
	return &Daemon{cfg: cfg, Store: st, Layers: layers, Snapshotter: sn, Puller: puller, Metrics: metrics,
		Tracing: tracing, Collector: collector}, nil
}

// listenUnix listens on a unix socket, replacing a stale socket file.
func listenUnix(path string, mode os.FileMode) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o711); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing stale socket %s: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, mode); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// Serve serves the snapshotter (gRPC on cfg.Address), the worker API (HTTP
// on cfg.API) and the metrics (cfg.Metrics, if set) until ctx is done,
// then stops gracefully: servers drain, pulls stop, every FUSE mount the
// worker made is unmounted and the sockets are removed. ready, if not nil,
// is called once every listener is up.
func (d *Daemon) Serve(ctx context.Context, ready func()) error {
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		serveErr error
	)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	fail := func(what string, err error) {
		if err == nil || errors.Is(err, http.ErrServerClosed) || errors.Is(err, grpc.ErrServerStopped) {
			return
		}
		errOnce.Do(func() { serveErr = fmt.Errorf("%s: %w", what, err) })
		cancel()
	}

	snl, err := listenUnix(d.cfg.Address, 0o660)
	if err != nil {
		d.close(ctx)
		return fmt.Errorf("snapshotter socket: %w", err)
	}
	defer os.Remove(d.cfg.Address)
	gs := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(gs, snapshotservice.FromSnapshotter(d.Snapshotter))
	wg.Add(1)
	go func() { defer wg.Done(); fail("snapshotter", gs.Serve(snl)) }()

	apil, err := listenUnix(d.cfg.API, 0o660)
	if err != nil {
		gs.Stop()
		wg.Wait()
		d.close(ctx)
		return fmt.Errorf("API socket: %w", err)
	}
	defer os.Remove(d.cfg.API)
	apiSrv := &http.Server{Handler: d.APIHandler(), ReadHeaderTimeout: 10 * time.Second}
	wg.Add(2)
	go func() { defer wg.Done(); d.Tracing.Run(ctx) }()
	go func() { defer wg.Done(); d.Collector.Run(ctx) }()
	wg.Add(1)
	go func() { defer wg.Done(); fail("API", apiSrv.Serve(apil)) }()

	var metricsSrv *http.Server
	if d.cfg.Metrics != "" {
		ml, err := net.Listen("tcp", d.cfg.Metrics)
		if err != nil {
			fail("metrics", err)
		} else {
			mux := http.NewServeMux()
			mux.Handle("/metrics", promhttp.HandlerFor(d.Metrics.Registry, promhttp.HandlerOpts{}))
			metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
			wg.Add(1)
			go func() { defer wg.Done(); fail("metrics", metricsSrv.Serve(ml)) }()
			log.G(ctx).WithField("address", ml.Addr().String()).Info("serving metrics")
		}
	}
	log.G(ctx).WithField("snapshotter", d.cfg.Address).WithField("api", d.cfg.API).
		WithField("registries", d.cfg.Hosts()).Info("starlight-worker ready")
	if ready != nil && ctx.Err() == nil {
		ready()
	}

	<-ctx.Done()
	log.G(ctx).Info("stopping")
	shutdownCtx, stop := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer stop()
	// Pull streams end when their pulls stop; stop them first so that
	// the API server drains quickly.
	d.Puller.Close()
	apiSrv.Shutdown(shutdownCtx)
	if metricsSrv != nil {
		metricsSrv.Shutdown(shutdownCtx)
	}
	stopped := make(chan struct{})
	go func() { gs.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-shutdownCtx.Done():
		gs.Stop()
	}
	wg.Wait()
	d.close(shutdownCtx)
	return serveErr
}

// close releases what New opened, unmounting every layer view.
func (d *Daemon) close(ctx context.Context) {
	d.Puller.Close()
	d.Tracing.Close(ctx)
	if err := d.Snapshotter.Close(); err != nil {
		log.G(ctx).WithError(err).Warn("closing snapshotter")
	}
	if err := d.Layers.Close(); err != nil {
		log.G(ctx).WithError(err).Warn("unmounting layers")
	}
	if err := d.Store.Close(); err != nil {
		log.G(ctx).WithError(err).Warn("closing the content store")
	}
}
