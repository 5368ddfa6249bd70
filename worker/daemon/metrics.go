package daemon

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics are the worker's Prometheus metrics.
type Metrics struct {
	Registry       *prometheus.Registry
	BytesReceived  prometheus.Counter
	FramesReceived prometheus.Counter
	Pulls          *prometheus.CounterVec   // result: ready, complete, failed
	PullSeconds    *prometheus.HistogramVec // phase: ready, complete
	Resumes        prometheus.Counter
	ActivePulls    prometheus.Gauge
}

// NewMetrics creates the metrics. pending reports the contents expected
// and not yet arrived: the reads that may block on them.
func NewMetrics(pending func() float64) *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		BytesReceived: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "starlight", Subsystem: "worker", Name: "received_bytes_total",
			Help: "Compressed content bytes received in delta bundles.",
		}),
		FramesReceived: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "starlight", Subsystem: "worker", Name: "received_frames_total",
			Help: "Content frames received in delta bundles.",
		}),
		Pulls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "starlight", Subsystem: "worker", Name: "pulls_total",
			Help: "Pulls by outcome: ready (usable), complete (every content arrived), failed.",
		}, []string{"result"}),
		PullSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "starlight", Subsystem: "worker", Name: "pull_seconds",
			Help:    "Time from the pull request until the image is usable (phase=ready) or complete (phase=complete).",
			Buckets: prometheus.ExponentialBuckets(0.05, 2, 14),
		}, []string{"phase"}),
		Resumes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "starlight", Subsystem: "worker", Name: "bundle_resumes_total",
			Help: "Broken bundle streams resumed.",
		}),
		ActivePulls: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "starlight", Subsystem: "worker", Name: "active_pulls",
			Help: "Pulls whose bundle is still streaming.",
		}),
	}
	m.Registry.MustRegister(m.BytesReceived, m.FramesReceived, m.Pulls, m.PullSeconds, m.Resumes, m.ActivePulls,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if pending != nil {
		m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "starlight", Subsystem: "worker", Name: "pending_contents",
			Help: "Contents expected and not arrived yet; reads of them wait.",
		}, pending))
	}
	return m
}
