// Package daemon wires starlight-worker together and serves it: it builds
// the content store, the layer registry, the puller, the tracer, the
// snapshotter and the garbage collector from the configuration, and serves
// the containerd snapshotter API (gRPC), the worker API (HTTP) and the
// metrics until it is stopped.
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
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"

	"github.com/starlight-project/starlight/api/remote"
	"github.com/starlight-project/starlight/api/remote/dockerconfig"
	"github.com/starlight-project/starlight/worker/config"
	"github.com/starlight-project/starlight/worker/cri"
	"github.com/starlight-project/starlight/worker/criproxy"
	"github.com/starlight-project/starlight/worker/demand"
	"github.com/starlight-project/starlight/worker/fdstore"
	"github.com/starlight-project/starlight/worker/fs"
	"github.com/starlight-project/starlight/worker/gc"
	"github.com/starlight-project/starlight/worker/importer"
	"github.com/starlight-project/starlight/worker/layers"
	"github.com/starlight-project/starlight/worker/pull"
	"github.com/starlight-project/starlight/worker/snapshotter"
	"github.com/starlight-project/starlight/worker/store"
	"github.com/starlight-project/starlight/worker/tracer"
)

// Daemon is a running worker's state.
type Daemon struct {
	cfg         *config.Config
	Store       *store.Store
	Layers      *layers.Registry
	Snapshotter snapshots.Snapshotter
	Puller      *pull.Puller
	Tracer      *tracer.Tracer
	Collector   *gc.Collector
	importer    *importer.Importer
	// keeper keeps the views' FUSE connections across restarts; nil
	// with fd_store = "off".
	keeper  *fdstore.Store
	metrics *prometheus.Registry
	// criSecrets holds the credentials of the CRI proxy's pulls in
	// flight.
	criSecrets *criproxy.Secrets
	criMetrics *criproxy.Metrics
	// cancel stops what New started in the background (on-demand
	// fetches).
	cancel context.CancelFunc
}

// Option changes how New builds the daemon.
type Option func(*options)

type options struct {
	pullBackoff   time.Duration
	holderCommand []string
}

// WithHolderCommand sets how to start the fd-holder when none runs (tests
// whose binary is not starlight-worker).
func WithHolderCommand(cmd []string) Option {
	return func(o *options) { o.holderCommand = cmd }
}

// WithPullBackoff sets the wait before the first resume of a broken bundle
// stream (tests shorten it).
func WithPullBackoff(d time.Duration) Option {
	return func(o *options) { o.pullBackoff = d }
}

// New opens the worker's state under cfg.Root: the content store
// (store/), the layer registry (layers/), the snapshotter (snapshots/),
// the image records (images/) and the traces (traces/). It mounts the
// known layers, so that snapshots made before a restart work again: the
// views an earlier worker left mounted (cfg.FDStore keeps their
// connections) are taken over, so the containers that run on them never
// notice, and the pulls it left unfinished resume.
func New(ctx context.Context, cfg *config.Config, opts ...Option) (d *Daemon, err error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if err := os.MkdirAll(cfg.Root, 0o711); err != nil {
		return nil, fmt.Errorf("creating root: %w", err)
	}
	d = &Daemon{cfg: cfg, metrics: prometheus.NewRegistry()}
	var bg context.Context
	bg, d.cancel = context.WithCancel(context.WithoutCancel(ctx))
	defer func() {
		if err != nil {
			d.close(ctx)
		}
	}()
	if d.Store, err = store.Open(filepath.Join(cfg.Root, "store")); err != nil {
		return nil, err
	}
	if d.keeper, err = fdstore.Open(ctx, fdstore.Options{
		Mode: cfg.FDStore, Socket: cfg.FDHolderSocket(), HolderCommand: o.holderCommand,
	}); err != nil {
		return nil, fmt.Errorf("opening the fd store (fd_store = %q; \"off\" runs without, and containers then lose their root file systems when the worker stops): %w", cfg.FDStore, err)
	}
	var keeper fs.FDKeeper
	if d.keeper != nil {
		keeper = d.keeper
	}
	// Complete layers leave FUSE where overlayfs stacks data-only layers
	// (layers.Materialize).
	var layerOpts []layers.Option
	if !cfg.MaterializeLayers() {
		log.G(ctx).Info("complete layers stay FUSE views (materialize = false)")
	} else if err := snapshotter.DataLayersSupported(cfg.Root, nil); err != nil {
		log.G(ctx).WithError(err).Warn("complete layers stay FUSE views")
	} else {
		layerOpts = append(layerOpts, layers.Materialize(d.Store))
	}
	if d.Layers, err = layers.Open(ctx, filepath.Join(cfg.Root, "layers"), d.Store, layers.FUSEMounter(d.Store, nil, keeper), layerOpts...); err != nil {
		return nil, err
	}
	rc := newRemote(registryHosts(cfg, nil))
	log.G(ctx).WithFields(log.Fields{"config_path": cfg.ConfigPath, "docker_config": dockerConfigPath(cfg)}).
		Info("registry host configuration and credentials")
	var fetcher *demand.Fetcher
	if cfg.DemandFetches > 0 {
		fetcher = demand.New(bg, d.Store, cfg.DemandFetches, d.metrics)
	}
	d.importer = importer.New(cfg.Containerd)
	d.criSecrets, d.criMetrics = criproxy.NewSecrets(), criproxy.NewMetrics(d.metrics)
	// A pull with credentials of its own (--user, a pod's pull secret)
	// gets a client of its own, those credentials first.
	clientWith := func(first remote.CredentialFunc) *remote.Client {
		return newRemote(registryHosts(cfg, nil).WithCredentials(first))
	}
	if d.Puller, err = pull.New(cfg, pull.Deps{
		Store: d.Store, Layers: d.Layers, Remote: rc, Importer: d.importer, Demand: fetcher,
		Metrics: pull.NewMetrics(d.metrics), RecordDir: filepath.Join(cfg.Root, "images"), Backoff: o.pullBackoff,
		ClientWith: clientWith, CRICredentials: d.criSecrets.Credentials,
	}); err != nil {
		return nil, err
	}
	reportClient := func(server config.Registry) *remote.Client { return newRemote(registryHosts(cfg, &server)) }
	if d.Tracer, err = tracer.New(filepath.Join(cfg.Root, "traces"), cfg, d.Layers, d.Store, rc, d.Puller,
		tracer.WithReportClient(reportClient)); err != nil {
		return nil, err
	}
	// The snapshotter sees the layer registry through the CRI resolver: a
	// Kubernetes pull of an image the worker does not know fetches it.
	if d.Snapshotter, err = snapshotter.New(filepath.Join(cfg.Root, "snapshots"),
		cri.NewResolver(d.Layers, d.Puller), snapshotter.WithTracer(d.Tracer)); err != nil {
		return nil, fmt.Errorf("opening snapshotter: %w", err)
	}
	d.Collector = gc.New(d.Layers, d.Store, d.Snapshotter, d.Puller)
	d.metrics.MustRegister(
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "starlight", Subsystem: "worker", Name: "pending_contents",
			Help: "Contents expected and not arrived yet; reads of them wait.",
		}, func() float64 { return float64(d.Store.Pending()) }))
	// The puller expected the contents of the pulls it resumes: reads
	// through the views taken over wait for them from the first request.
	d.Layers.MountAll(ctx)
	if d.keeper != nil {
		if dropped := d.keeper.DropUnclaimed(ctx); len(dropped) > 0 {
			log.G(ctx).WithField("names", dropped).Warn("dropped kept FUSE connections of layers this worker does not know")
		}
	}
	return d, nil
}

// registryHosts is how the worker reaches every registry host, for every
// request (delta bundles, ranged blob reads, trace reports, plain pulls):
// containerd's host configuration directory (config_path: hosts.toml
// mirrors, CAs, client certificates, headers, plain HTTP servers),
// combined with the [[registry]] entries (plain_http for a host that
// hosts.toml does not configure; username and password first) and the
// docker config.json (credentials of the hosts the worker config has none
// for). override, if set, is a trace report's --server, whose scheme and
// credentials win for its host.
func registryHosts(cfg *config.Config, override *config.Registry) *remote.Hosts {
	source := "the worker configuration"
	if override != nil {
		source = "the --server URL or the worker configuration"
	}
	return remote.NewHosts(remote.HostsOptions{
		Dir: cfg.ConfigPath,
		Static: func(host string) remote.HostConfig {
			reg, _ := cfg.Registry(host)
			if override != nil && host == override.Host {
				reg = *override
			}
			return remote.HostConfig{PlainHTTP: reg.PlainHTTP, Username: reg.Username, Password: reg.Password}
		},
		StaticSource: source,
		Credentials:  (&dockerconfig.File{Path: cfg.DockerConfig}).Credentials,
	})
}

// dockerConfigPath is the docker config.json the worker reads.
func dockerConfigPath(cfg *config.Config) string {
	if cfg.DockerConfig != "" {
		return cfg.DockerConfig
	}
	return dockerconfig.DefaultPath()
}

// newRemote is the worker's registry client over h.
func newRemote(h *remote.Hosts) *remote.Client {
	return remote.New(remote.Options{UserAgent: "starlight-worker", Hosts: h.Lookup, HostsVersion: h.Version, CredentialSource: h.CredentialSource})
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
// then stops gracefully: servers drain, pulls stop (they resume at the next
// start), the layer views stay mounted for the next worker to take over
// (unmounted only with fd_store = "off") and the sockets are removed.
// ready, if not nil, is called once every listener is up; systemd is told
// too (Type=notify).
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
	go func() { defer wg.Done(); d.Tracer.Run(ctx) }()
	go func() { defer wg.Done(); d.Collector.Run(ctx) }()
	wg.Add(1)
	go func() { defer wg.Done(); fail("API", apiSrv.Serve(apil)) }()

	var stopCRI func()
	if d.cfg.CRIProxy != "" {
		l, srv, stop, err := d.criProxyServer(ctx)
		if err != nil {
			fail("CRI proxy", err)
		} else {
			defer os.Remove(d.cfg.CRIProxy)
			stopCRI = stop
			wg.Add(1)
			go func() { defer wg.Done(); fail("CRI proxy", srv.Serve(l)) }()
		}
	}

	var metricsSrv *http.Server
	if d.cfg.Metrics != "" {
		ml, err := net.Listen("tcp", d.cfg.Metrics)
		if err != nil {
			fail("metrics", err)
		} else {
			mux := http.NewServeMux()
			mux.Handle("/metrics", promhttp.HandlerFor(d.metrics, promhttp.HandlerOpts{}))
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
	if err := fdstore.NotifyReady(); err != nil {
		log.G(ctx).WithError(err).Warn("telling systemd the worker is ready")
	}

	<-ctx.Done()
	log.G(ctx).Info("stopping")
	shutdownCtx, stop := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer stop()
	// Pull streams end when their pulls stop; stop them first so that
	// the API server drains quickly.
	d.Puller.Close()
	apiSrv.Shutdown(shutdownCtx)
	if stopCRI != nil {
		stopCRI()
	}
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

// close releases what New opened; kept layer views stay mounted. It runs
// on a partly built daemon too (New failed).
func (d *Daemon) close(ctx context.Context) {
	d.cancel()
	if d.Puller != nil {
		d.Puller.Close()
	}
	if d.Tracer != nil {
		d.Tracer.Close(ctx)
	}
	if d.Snapshotter != nil {
		if err := d.Snapshotter.Close(); err != nil {
			log.G(ctx).WithError(err).Warn("closing snapshotter")
		}
	}
	if d.Layers != nil {
		if err := d.Layers.Close(); err != nil {
			log.G(ctx).WithError(err).Warn("closing the layer views")
		}
	}
	if d.keeper != nil {
		if err := d.keeper.Close(); err != nil {
			log.G(ctx).WithError(err).Warn("closing the fd store")
		}
	}
	if d.importer != nil {
		if err := d.importer.Close(); err != nil {
			log.G(ctx).WithError(err).Warn("closing the containerd connection")
		}
	}
	if d.Store != nil {
		if err := d.Store.Close(); err != nil {
			log.G(ctx).WithError(err).Warn("closing the content store")
		}
	}
}
