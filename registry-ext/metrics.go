package registryext

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are registered with the default Prometheus registry, which the
// registry's debug server exposes (http.debug.prometheus in config.yml)
// next to distribution's own.
var (
	conversionsTotal = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "starlight", Subsystem: "registry", Name: "conversions_total",
		Help: "Image conversions completed.",
	})
	conversionsFailed = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "starlight", Subsystem: "registry", Name: "conversions_failed_total",
		Help: "Image conversion attempts that failed (retried or not).",
	})
	conversionSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "starlight", Subsystem: "registry", Name: "conversion_seconds",
		Help:    "Duration of image conversions, indexing included.",
		Buckets: prometheus.ExponentialBuckets(0.1, 2, 14), // 0.1s .. ~27min
	})
	queueDepth = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "starlight", Subsystem: "registry", Name: "queue_jobs",
		Help: "Conversion jobs in the durable queue, by state.",
	}, []string{"state"})
	predictions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "starlight", Subsystem: "registry", Name: "predictions_total",
		Help: "Startup predictions of converted platform manifests, by result: stored, empty (nothing to predict), failed.",
	}, []string{"result"})
)

func init() {
	prometheus.MustRegister(conversionsTotal, conversionsFailed, conversionSeconds, queueDepth, predictions)
}
