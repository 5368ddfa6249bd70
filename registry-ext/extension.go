// Package registryext is the Starlight extension of the CNCF distribution
// registry. Linked into a registry binary (see cmd/starlight-registry), it
// registers itself as the "starlight" registry and repository middleware
// and as an HTTP handler middleware:
//
//   - every manifest push queues a durable conversion job in the index
//     database (package schema);
//   - conversion workers turn the pushed image into eStargz (package
//     convert) through the registry's own storage, index every file of
//     every layer, and tag the result <tag><tagsuffix>;
//   - the /starlight/ routes on the registry's listener serve the status
//     of an image, the conversion queue and delta bundles (package delta),
//     and take startup trace reports, merged into the priorities that
//     order the bundles; all behind the registry's configured access
//     controller.
package registryext

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/distribution/distribution/v3"

	"github.com/starlight-project/starlight/registry-ext/delta"
	"github.com/starlight-project/starlight/schema"
)

// Extension is the process-wide state of one configured index database:
// the database, the storage namespace conversions write through, and the
// conversion workers. Every registry and repository middleware instance and
// the HTTP handler configured with the same database share it.
type Extension struct {
	opts    Options
	db      *schema.DB
	owner   string // names this process in job leases
	planner *delta.Planner

	mu      sync.Mutex
	ns      distribution.Namespace // nil until a registry middleware supplies it
	refs    int
	started bool
	closed  bool

	closeOnce sync.Once
	closeErr  error

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup
	wake   chan struct{}
	poll   time.Duration

	conversions atomic.Int64 // full conversions run, for tests and logs
}

// pollInterval is how often idle workers look for runnable jobs that no
// push announced: delayed retries, jobs queued by other replicas.
var pollInterval = time.Second

var (
	extMu      sync.Mutex
	extensions = map[string]*Extension{}
)

// Lookup returns the running Extension of a database DSN, or nil.
func Lookup(dsn string) *Extension {
	extMu.Lock()
	defer extMu.Unlock()
	return extensions[normalizeDSN(dsn)]
}

// acquire returns the Extension of opts.Database, creating it on first
// use, and counts a reference to it. ns may be nil (a repository
// middleware or handler asking first); workers start once a Namespace is
// known.
func acquire(opts Options, ns distribution.Namespace, ref bool) (*Extension, error) {
	extMu.Lock()
	defer extMu.Unlock()
	x := extensions[opts.Database]
	if x == nil {
		db, err := schema.Open(context.Background(), opts.Database)
		if err != nil {
			return nil, err
		}
		ctx, cancel := context.WithCancel(context.Background())
		x = &Extension{
			opts:   opts,
			db:     db,
			owner:  processOwner(),
			ctx:    ctx,
			cancel: cancel,
			wake:   make(chan struct{}, 1),
			poll:   pollInterval,
		}
		extensions[opts.Database] = x
		log.L.WithFields(log.Fields{"database": redactDSN(opts.Database), "autoconvert": opts.AutoConvert,
			"workers": opts.Workers, "tagsuffix": opts.TagSuffix, "predict": opts.Predict}).Info("starlight: extension started")
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if ref {
		x.refs++
	}
	if ns != nil && x.ns == nil {
		x.ns = ns
		x.planner = delta.New(x.db, blobOpener{ns: ns}).WithPriority(delta.NewTraced(x.db)).WithLimits(planLimits(x.opts))
		x.startLocked()
	}
	return x, nil
}

// release drops a reference taken by acquire and closes the Extension with
// the last one (the registry app shut down).
func (x *Extension) release() {
	x.mu.Lock()
	x.refs--
	last := x.refs <= 0
	x.mu.Unlock()
	if last {
		x.Close() //nolint:errcheck // logged inside
	}
}

// Close stops the workers, giving running jobs back to the queue, and
// closes the database. A later middleware initialisation with the same
// database starts a new Extension. Concurrent and repeated calls wait for
// the first to finish.
func (x *Extension) Close() error {
	x.closeOnce.Do(func() {
		x.mu.Lock()
		x.closed = true
		x.mu.Unlock()
		extMu.Lock()
		if extensions[x.opts.Database] == x {
			delete(extensions, x.opts.Database)
		}
		extMu.Unlock()
		x.cancel()
		x.wg.Wait()
		if p := x.deltaPlanner(); p != nil {
			p.Close()
		}
		x.closeErr = x.db.Close()
		log.L.WithField("database", redactDSN(x.opts.Database)).Info("starlight: extension stopped")
	})
	return x.closeErr
}

// CloseAll closes every running Extension. A registry binary calls it
// when its server has stopped, so running conversions are given back to
// the queue before the process exits.
func CloseAll() {
	extMu.Lock()
	all := make([]*Extension, 0, len(extensions))
	for _, x := range extensions {
		all = append(all, x)
	}
	extMu.Unlock()
	for _, x := range all {
		x.Close() //nolint:errcheck // logged
	}
}

// DB returns the index database.
func (x *Extension) DB() *schema.DB { return x.db }

// Options returns the options the Extension runs with.
func (x *Extension) Options() Options { return x.opts }

func (x *Extension) namespace() distribution.Namespace {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.ns
}

func (x *Extension) deltaPlanner() *delta.Planner {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.planner
}

// notify wakes an idle worker after a job was queued.
func (x *Extension) notify() {
	select {
	case x.wake <- struct{}{}:
	default:
	}
}

func (x *Extension) startLocked() {
	if x.started || x.closed {
		return
	}
	x.started = true
	for i := 0; i < x.opts.Workers; i++ {
		x.wg.Add(1)
		go x.worker(i)
	}
	x.wg.Add(1)
	go x.gauge()
}

// gauge refreshes the queue depth metric.
func (x *Extension) gauge() {
	defer x.wg.Done()
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		x.updateQueueDepth()
		select {
		case <-x.ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (x *Extension) updateQueueDepth() {
	q, r, err := x.db.QueueDepth(x.ctx)
	if err != nil {
		return
	}
	queueDepth.WithLabelValues("queued").Set(float64(q))
	queueDepth.WithLabelValues("converting").Set(float64(r))
}

// processOwner names this process in job leases: host, pid and a random
// suffix, so two registries never share an owner.
func processOwner() string {
	host, _ := os.Hostname()
	var b [4]byte
	rand.Read(b[:]) //nolint:errcheck // never fails
	return fmt.Sprintf("%s/%d/%s", host, os.Getpid(), hex.EncodeToString(b[:]))
}

// redactDSN hides a PostgreSQL password from logs.
func redactDSN(dsn string) string {
	if u, err := url.Parse(dsn); err == nil && u.User != nil {
		if _, has := u.User.Password(); has {
			return u.Redacted()
		}
	}
	return dsn
}
