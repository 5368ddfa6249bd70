package registryext

import (
	"context"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/registry-ext/delta"
)

// What the /starlight/ routes may hold at once is set by configuration,
// never by traffic: a bundle stream holds a slot of maxbundlestreams from
// before its body is read until its last frame; a request beyond the
// limit waits in a bounded queue for a bounded time, then is answered 503
// with Retry-After (api/remote's client retries it). Trace ingestions
// (a decoded report and a merge in memory each) are admitted the same way.
const (
	// queueFactor is how many requests may wait per slot.
	queueFactor = 4
	// busyRetryAfter is the Retry-After of a 503 for a full queue: long
	// enough for a few streams of a typical image to end.
	busyRetryAfter = 5 * time.Second
)

var (
	admitted = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "starlight", Subsystem: "registry", Name: "admitted_requests",
		Help: "Requests holding a slot (bundle streams, trace ingestions), by kind.",
	}, []string{"kind"})
	refused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "starlight", Subsystem: "registry", Name: "busy_refusals_total",
		Help: "Requests answered 503 because every slot stayed taken for the queue wait, by kind.",
	}, []string{"kind"})
)

func init() {
	prometheus.MustRegister(admitted, refused)
}

// planLimits are the delta planner's bounds from the middleware options.
func planLimits(o Options) delta.Limits {
	size := o.PlanCacheSize
	if size == 0 {
		size = -1 // none kept (delta's 0 is its default)
	}
	return delta.Limits{WriteTimeout: o.BundleWriteTimeout, Plans: o.MaxBundlePlans, CacheSize: size, SpoolDir: o.TempDir}
}

// admission bounds the requests of one kind that run at once, with a
// bounded queue and a bounded wait.
type admission struct {
	kind  string // for messages and metrics: "bundle", "trace"
	slots chan struct{}
	queue chan struct{}
	wait  time.Duration
}

func newAdmission(kind string, slots chan struct{}, wait time.Duration) *admission {
	return &admission{kind: kind, slots: slots, queue: make(chan struct{}, cap(slots)*queueFactor), wait: wait}
}

// acquire takes a slot, waiting at most the queue wait for one, and
// returns its release. A full queue or a wait that runs out is a 503
// with Retry-After; a cancelled request returns ctx's error.
func (a *admission) acquire(ctx context.Context) (release func(), err error) {
	release = func() {
		admitted.WithLabelValues(a.kind).Dec()
		<-a.slots
	}
	select {
	case a.slots <- struct{}{}:
		admitted.WithLabelValues(a.kind).Inc()
		return release, nil
	default:
	}
	select {
	case a.queue <- struct{}{}:
		defer func() { <-a.queue }()
	default:
		return nil, a.busy()
	}
	timer := time.NewTimer(a.wait)
	defer timer.Stop()
	select {
	case a.slots <- struct{}{}:
		admitted.WithLabelValues(a.kind).Inc()
		return release, nil
	case <-timer.C:
		return nil, a.busy()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (a *admission) busy() error {
	refused.WithLabelValues(a.kind).Inc()
	e := errorf(http.StatusServiceUnavailable, api.CodeUnavailable,
		"the registry is serving as many %s requests as it is configured to (%d at once); retry in %s",
		a.kind, cap(a.slots), busyRetryAfter).(*apiError)
	e.retryAfter = busyRetryAfter
	return e
}
