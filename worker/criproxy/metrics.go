package criproxy

import "github.com/prometheus/client_golang/prometheus"

// Metrics counts the PullImage calls the proxy forwards.
type Metrics struct {
	pulls *prometheus.CounterVec
}

// NewMetrics registers the proxy's metrics on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{pulls: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "starlight", Subsystem: "worker", Name: "cri_pulls_total",
		Help: "CRI PullImage calls forwarded to containerd, by whether they carried registry credentials.",
	}, []string{"credentials"})}
	reg.MustRegister(m.pulls)
	return m
}

func (m *Metrics) pull(withCredentials bool) {
	if m == nil {
		return
	}
	v := "no"
	if withCredentials {
		v = "yes"
	}
	m.pulls.WithLabelValues(v).Inc()
}
