package registryext

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/distribution/distribution/v3/configuration"
)

// Name is the name the extension registers under, in both
// middleware.registry and middleware.repository of the registry's config.
const Name = "starlight"

// Defaults of the middleware options.
const (
	DefaultDatabase    = "/var/lib/starlight/index.db"
	DefaultTagSuffix   = "-starlight"
	DefaultWorkers     = 2
	DefaultMaxAttempts = 3
	DefaultRetryDelay  = 30 * time.Second
	DefaultLease       = 2 * time.Minute
	DefaultDigestDelay = 10 * time.Second

	DefaultMaxBundleStreams   = 32
	DefaultBundleQueueWait    = 10 * time.Second
	DefaultBundleWriteTimeout = time.Minute
	DefaultMaxBundlePlans     = 2
	DefaultPlanCacheSize      = 256 << 20
)

// Options are the middleware options, the same map under
// middleware.registry and middleware.repository:
//
//	autoconvert  bool      queue a conversion for every push (default true)
//	database     string    index DSN: SQLite path or sqlite:// URL, or
//	                       postgres://... (default /var/lib/starlight/index.db)
//	tagsuffix    string    converted tag = pushed tag + suffix (default -starlight)
//	workers      int       concurrent conversions (default 2)
//	tempdir      string    where layers are spooled while converting
//	chunksize    int       eStargz chunk size in bytes
//	maxattempts  int       attempts of a failing conversion (default 3)
//	retrydelay   duration  delay before the first retry, doubled after (default 30s)
//	lease        duration  a running job's lease, renewed while it runs; a
//	                       crashed registry's jobs are retaken after it (default 2m)
//	digestdelay  duration  how long a manifest pushed by digest only waits
//	                       before it converts on its own, so the platform
//	                       manifests of an index being pushed are converted
//	                       with the index, not twice (default 10s)
//	predict      bool      predict at conversion the files a container of
//	                       the image reads first (entrypoint, interpreter,
//	                       libraries) and order its bundles by that until
//	                       a real trace exists (default true; docs/TRACES.md)
//
// The bounds of serving bundles (docs/ARCHITECTURE.md, "Bounded memory"):
//
//	maxbundlestreams    int       bundles served at once (default 32); up
//	                              to 4× as many requests wait for a slot
//	bundlequeuewait     duration  how long a request waits for a slot before
//	                              it is answered 503 with Retry-After (default 10s)
//	bundlewritetimeout  duration  a stream whose client accepts no byte for
//	                              that long is cut (default 1m)
//	maxbundleplans      int       bundle plans computed at once (default 2);
//	                              each holds its image's trees in memory
//	plancachesize       int       bytes of temporary disk (under tempdir) for
//	                              computed plans kept for the requests that
//	                              follow (default 268435456; 0: none kept)
type Options struct {
	AutoConvert bool
	Database    string
	TagSuffix   string
	Workers     int
	TempDir     string
	ChunkSize   int
	MaxAttempts int
	RetryDelay  time.Duration
	Lease       time.Duration
	DigestDelay time.Duration
	Predict     bool

	MaxBundleStreams   int
	BundleQueueWait    time.Duration
	BundleWriteTimeout time.Duration
	MaxBundlePlans     int
	PlanCacheSize      int64
}

// ParseOptions reads the middleware options map, applying defaults.
func ParseOptions(m map[string]any) (Options, error) {
	o := Options{
		AutoConvert: true,
		Database:    DefaultDatabase,
		TagSuffix:   DefaultTagSuffix,
		Workers:     DefaultWorkers,
		MaxAttempts: DefaultMaxAttempts,
		RetryDelay:  DefaultRetryDelay,
		Lease:       DefaultLease,
		DigestDelay: DefaultDigestDelay,
		Predict:     true,

		MaxBundleStreams:   DefaultMaxBundleStreams,
		BundleQueueWait:    DefaultBundleQueueWait,
		BundleWriteTimeout: DefaultBundleWriteTimeout,
		MaxBundlePlans:     DefaultMaxBundlePlans,
		PlanCacheSize:      DefaultPlanCacheSize,
	}
	var err error
	for k, v := range m {
		switch strings.ToLower(k) {
		case "autoconvert":
			o.AutoConvert, err = boolOpt(v)
		case "database":
			o.Database, err = stringOpt(v)
		case "tagsuffix":
			o.TagSuffix, err = stringOpt(v)
		case "workers":
			o.Workers, err = intOpt(v)
		case "tempdir":
			o.TempDir, err = stringOpt(v)
		case "chunksize":
			o.ChunkSize, err = intOpt(v)
		case "maxattempts":
			o.MaxAttempts, err = intOpt(v)
		case "retrydelay":
			o.RetryDelay, err = durationOpt(v)
		case "lease":
			o.Lease, err = durationOpt(v)
		case "digestdelay":
			o.DigestDelay, err = durationOpt(v)
		case "predict":
			o.Predict, err = boolOpt(v)
		case "maxbundlestreams":
			o.MaxBundleStreams, err = intOpt(v)
		case "bundlequeuewait":
			o.BundleQueueWait, err = durationOpt(v)
		case "bundlewritetimeout":
			o.BundleWriteTimeout, err = durationOpt(v)
		case "maxbundleplans":
			o.MaxBundlePlans, err = intOpt(v)
		case "plancachesize":
			var n int
			n, err = intOpt(v)
			o.PlanCacheSize = int64(n)
		default:
			return o, fmt.Errorf("%s middleware: unknown option %q", Name, k)
		}
		if err != nil {
			return o, fmt.Errorf("%s middleware: option %s: %w", Name, k, err)
		}
	}
	switch {
	case o.Database == "":
		return o, fmt.Errorf("%s middleware: option database is empty", Name)
	case o.TagSuffix == "" || !validTagSuffix(o.TagSuffix):
		return o, fmt.Errorf("%s middleware: tagsuffix %q cannot end a tag", Name, o.TagSuffix)
	case o.Workers < 1:
		return o, fmt.Errorf("%s middleware: workers must be at least 1", Name)
	case o.MaxAttempts < 1:
		return o, fmt.Errorf("%s middleware: maxattempts must be at least 1", Name)
	case o.ChunkSize < 0:
		return o, fmt.Errorf("%s middleware: chunksize must not be negative", Name)
	case o.Lease < time.Second:
		return o, fmt.Errorf("%s middleware: lease must be at least 1s", Name)
	case o.RetryDelay < 0 || o.DigestDelay < 0:
		return o, fmt.Errorf("%s middleware: delays must not be negative", Name)
	case o.MaxBundleStreams < 1 || o.MaxBundlePlans < 1:
		return o, fmt.Errorf("%s middleware: maxbundlestreams and maxbundleplans must be at least 1", Name)
	case o.BundleQueueWait < 0:
		return o, fmt.Errorf("%s middleware: bundlequeuewait must not be negative", Name)
	case o.BundleWriteTimeout < time.Second:
		return o, fmt.Errorf("%s middleware: bundlewritetimeout must be at least 1s", Name)
	case o.PlanCacheSize < 0:
		return o, fmt.Errorf("%s middleware: plancachesize must not be negative", Name)
	}
	o.Database = normalizeDSN(o.Database)
	return o, nil
}

// validTagSuffix reports whether s can follow any tag: tags are
// [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}.
func validTagSuffix(s string) bool {
	if len(s) > 64 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-') {
			return false
		}
	}
	return true
}

// normalizeDSN makes SQLite paths absolute, so that "index.db" and
// "./index.db" name the same Extension.
func normalizeDSN(dsn string) string {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		return dsn
	}
	path := strings.TrimPrefix(dsn, "sqlite://")
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	return "sqlite://" + path
}

// configOptions finds the extension's options in a registry config:
// middleware.registry first, then middleware.repository. ok is false when
// neither lists an enabled starlight middleware.
func configOptions(config *configuration.Configuration) (opts Options, ok bool, err error) {
	if config == nil {
		return opts, false, nil
	}
	for _, kind := range []string{"registry", "repository"} {
		for _, mw := range config.Middleware[kind] {
			if mw.Name == Name && !mw.Disabled {
				opts, err = ParseOptions(mw.Options)
				return opts, true, err
			}
		}
	}
	return opts, false, nil
}

func boolOpt(v any) (bool, error) {
	switch v := v.(type) {
	case bool:
		return v, nil
	case string:
		return strconv.ParseBool(v)
	}
	return false, fmt.Errorf("want a boolean, got %T", v)
}

func stringOpt(v any) (string, error) {
	if s, ok := v.(string); ok {
		return s, nil
	}
	return "", fmt.Errorf("want a string, got %T", v)
}

func intOpt(v any) (int, error) {
	switch v := v.(type) {
	case int:
		return v, nil
	case int64:
		return int(v), nil
	case uint64:
		return int(v), nil
	case float64:
		if v != float64(int(v)) {
			return 0, fmt.Errorf("want an integer, got %v", v)
		}
		return int(v), nil
	case string:
		return strconv.Atoi(v)
	}
	return 0, fmt.Errorf("want an integer, got %T", v)
}

// durationOpt accepts "30s" style strings, or a number of seconds.
func durationOpt(v any) (time.Duration, error) {
	if s, ok := v.(string); ok {
		return time.ParseDuration(s)
	}
	n, err := intOpt(v)
	if err != nil {
		return 0, fmt.Errorf("want a duration like \"30s\": %w", err)
	}
	return time.Duration(n) * time.Second, nil
}
