package pull

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the pulls' Prometheus metrics.
type Metrics struct {
	BytesReceived  prometheus.Counter
	FramesReceived prometheus.Counter
	Pulls          *prometheus.CounterVec   // result: ready, complete, failed
	PullSeconds    *prometheus.HistogramVec // phase: ready, complete
	Resumes        prometheus.Counter
	ActivePulls    prometheus.Gauge
	// ImageBytes and DedupBytes add up the registry's figures of each
	// bundle: the compressed contents of the image, and of those the
	// ones left out because the worker held them.
	ImageBytes prometheus.Counter
	DedupBytes prometheus.Counter
}

// NewMetrics creates the metrics and registers them with reg (if not nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
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
		ImageBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "starlight", Subsystem: "worker", Name: "image_bytes_total",
			Help: "Compressed content bytes of the images pulled (what a pull without dedup would move).",
		}),
		DedupBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "starlight", Subsystem: "worker", Name: "dedup_bytes_total",
			Help: "Compressed content bytes the registry left out of bundles because the worker held them.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.BytesReceived, m.FramesReceived, m.Pulls, m.PullSeconds, m.Resumes, m.ActivePulls, m.ImageBytes, m.DedupBytes)
	}
	return m
}
