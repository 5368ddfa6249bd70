// Package remote is Starlight's one client of registries. The worker uses
// it for the Starlight routes (POST /starlight/delta, POST
// /starlight/v1/traces) and for ranged blob reads; its Resolver serves
// standard pulls and pushes (the worker's plain containerd pull, and
// convert).
//
// It is built on containerd's remotes/docker: where a registry host is and
// how to reach it (scheme, TLS, HTTP client, credentials, extra headers,
// mirrors) is a [docker.RegistryHosts], and authentication is the host's
// [docker.Authorizer] (Basic, or Bearer tokens from the registry's token
// service, cached per scope). Options.Hosts is the single point where
// registry access is configured:
//
//   - [NewHosts] is what the worker and ctr-starlight use: containerd's
//     own hosts.toml directories (config.ConfigureHosts with
//     config.HostDirFromRoot: mirrors, ca, client, skip_verify, header,
//     server = "http://..."), combined with Starlight's per-host settings
//     (plain HTTP, username and password) and a credential source such
//     as a docker config.json (package dockerconfig). Every client it
//     builds gets the timeouts a delta stream needs ([UpdateClient]).
//   - [StaticHosts] answers from simple per-host settings alone.
//
// Errors say what to fix: an [AuthError] names the endpoint host and where
// its credentials came from (Options.CredentialSource, never the secret),
// a [CredentialError] the source that failed, and a certificate error the
// CA files the endpoint trusts.
//
// A Client asks Options.Hosts once per host name and keeps the answer, so
// that connections and tokens are reused across requests (ConfigureHosts
// builds a new HTTP client and Authorizer on every call). It asks again
// after an authorization failure (containerd's Authorizer keeps a failed
// token fetch for good, and a fresh one starts over), and when
// Options.HostsVersion says the host's configuration changed.
//
// Unlike package api, this package depends on containerd.
package remote

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/remotes"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

// Registry routes of the Starlight extension. They sit at the root of a
// registry host, next to /v2.
const (
	DeltaPath  = "/starlight/delta"
	TracesPath = "/starlight/v1/traces"
)

// DefaultIdleTimeout is the IdleTimeout of a zero Options.
const DefaultIdleTimeout = 2 * time.Minute

// Options configure a Client.
type Options struct {
	// Hosts resolves a host name as it appears in image references
	// ("registry.example.com", "127.0.0.1:5000") to where and how to
	// reach it. nil means HTTPS without credentials for every host.
	Hosts docker.RegistryHosts
	// IdleTimeout aborts a delta stream that delivers no byte for that
	// long, so that a dead connection turns into a resume instead of a
	// pull that hangs forever. 0 means DefaultIdleTimeout, a negative
	// value no limit.
	IdleTimeout time.Duration
	// UserAgent, if set, is sent with every request, the Resolver's too.
	UserAgent string
	// CredentialSource names, for an AuthError, where the credentials
	// of an endpoint host came from (found), or where they were looked
	// for: Hosts.CredentialSource. It never answers a secret. nil: the
	// error names no source.
	CredentialSource func(host string) (source string, found bool)
	// HostsVersion, if set, answers a value that changes with the
	// configuration of a host (Hosts.Version): when it differs from the
	// one at the time Hosts answered, the Client asks Hosts again
	// instead of keeping the answer.
	HostsVersion func(host string) string
}

// Client talks to registries. It is safe for concurrent use.
type Client struct {
	opts      Options
	cache     *hostCache // of opts.Hosts
	plainHTTP bool
}

// New returns a Client.
func New(opts Options) *Client {
	if opts.Hosts == nil {
		opts.Hosts = StaticHosts(nil)
	}
	if opts.IdleTimeout == 0 {
		opts.IdleTimeout = DefaultIdleTimeout
	}
	return &Client{opts: opts, cache: &hostCache{hosts: opts.Hosts, version: opts.HostsVersion,
		known: map[string]*cachedHost{}, warned: map[string]bool{}}}
}

// WithPlainHTTP returns a Client that talks HTTP to the registry host
// itself, whatever Options.Hosts says: for a request that asks for plain
// HTTP. Mirrors (endpoints on other hosts) keep their scheme. It shares
// c's connections and tokens.
func (c *Client) WithPlainHTTP() *Client {
	p := *c
	p.plainHTTP = true
	return &p
}

// Hosts returns the host configuration c uses: Options.Hosts, memoized
// (every call for a host name answers the same HTTP clients and
// Authorizers), the host's own endpoint over HTTP after WithPlainHTTP.
func (c *Client) Hosts() docker.RegistryHosts {
	if c.plainHTTP {
		return func(host string) ([]docker.RegistryHost, error) {
			endpoints, err := c.cache.lookup(host)
			if err != nil {
				return nil, err
			}
			plain := make([]docker.RegistryHost, len(endpoints))
			for i, e := range endpoints {
				if !isMirror(host, e.Host) {
					e.Scheme = "http"
				}
				plain[i] = e
			}
			return plain, nil
		}
	}
	return c.cache.lookup
}

// Resolver returns a containerd resolver over c's hosts (and so the same
// connections and tokens), for standard pulls and pushes. Each call
// returns a new resolver, with a new push tracker.
func (c *Client) Resolver() remotes.Resolver {
	return docker.NewResolver(docker.ResolverOptions{Hosts: c.Hosts(), Headers: c.header()})
}

func (c *Client) header() http.Header {
	h := http.Header{}
	if c.opts.UserAgent != "" {
		h.Set("User-Agent", c.opts.UserAgent)
	}
	return h
}

// Delta posts req to the registry at host and returns the bundle stream.
// The caller closes the stream; it is aborted when ctx is done or when it
// stalls for IdleTimeout. The request goes to the first endpoint of host
// that may pull and resolve (a mirror that answers 404 or cannot be
// reached passes it on to the next). The request names the repository
// without the host, so a mirror that is a Starlight registry serves its
// own copy of the same repository.
func (c *Client) Delta(ctx context.Context, host, repository string, req api.DeltaRequest) (io.ReadCloser, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	var resp *http.Response
	for attempt := 0; ; attempt++ {
		resp, err = c.do(ctx, host, request{
			method: http.MethodPost, path: DeltaPath, starlight: true,
			caps:  docker.HostCapabilityPull | docker.HostCapabilityResolve,
			scope: pullScope(repository), body: body,
			header: http.Header{"Content-Type": {"application/json"}, "Accept": {api.MediaTypeBundle}},
		})
		if err != nil {
			cancel()
			return nil, err
		}
		wait, busy := retryAfter(resp)
		if !busy || attempt == busyRetries {
			break
		}
		// The registry serves as many bundles as it is configured to:
		// ask again when it says, a few times.
		drain(resp)
		log.G(ctx).WithFields(log.Fields{"host": host, "repository": repository, "retryIn": wait}).
			Info("the registry is busy serving bundles; retrying")
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			cancel()
			return nil, ctx.Err()
		}
	}
	if resp.StatusCode != http.StatusOK {
		defer cancel()
		return nil, readRegistryError(resp, true)
	}
	return newIdleReader(resp.Body, cancel, c.opts.IdleTimeout), nil
}

// A registry that serves as many bundles as it is configured to answers
// 503 with Retry-After; Delta waits as told (at most maxBusyWait a time)
// and asks again, busyRetries times at most.
const (
	busyRetries = 5
	maxBusyWait = 30 * time.Second
)

// retryAfter reports whether resp is a 503 with a Retry-After (seconds
// or an HTTP date), and how long to wait, at least a second and at most
// maxBusyWait.
func retryAfter(resp *http.Response) (time.Duration, bool) {
	if resp.StatusCode != http.StatusServiceUnavailable {
		return 0, false
	}
	v := strings.TrimSpace(resp.Header.Get("Retry-After"))
	if v == "" {
		return 0, false
	}
	var d time.Duration
	if s, err := strconv.Atoi(v); err == nil {
		d = time.Duration(s) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = time.Until(t)
	} else {
		return 0, false
	}
	return min(max(d, time.Second), maxBusyWait), true
}

// PostTrace uploads one trace report to the registry at host: to its first
// endpoint that may push, with pull and push access to the report's
// repository.
func (c *Client) PostTrace(ctx context.Context, host string, report *api.TraceReport) (*api.TraceResult, error) {
	body, err := json.Marshal(report)
	if err != nil {
		return nil, err
	}
	resp, err := c.do(ctx, host, request{
		method: http.MethodPost, path: TracesPath, starlight: true,
		caps:  docker.HostCapabilityPush,
		scope: "repository:" + report.Repository + ":pull,push", body: body,
		header: http.Header{"Content-Type": {"application/json"}, "Accept": {"application/json"}},
	})
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	// 201 for a new trace, 200 for one the registry already had.
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		return nil, readRegistryError(resp, true)
	}
	var res api.TraceResult
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&res); err != nil {
		return nil, fmt.Errorf("POST %s: decoding the answer: %w", resp.Request.URL.Redacted(), err)
	}
	return &res, nil
}

// BlobRange returns length bytes of a blob of repository from offset off:
// a ranged GET of the blob endpoint of the first endpoint of host that may
// pull (mirrors included). A registry (or a storage redirect) that ignores
// the range is handled by skipping to off.
func (c *Client) BlobRange(ctx context.Context, host, repository string, blob digest.Digest, off, length int64) (io.ReadCloser, error) {
	if off < 0 || length <= 0 {
		return nil, fmt.Errorf("blob %s: invalid range %d+%d", blob, off, length)
	}
	resp, err := c.do(ctx, host, request{
		method: http.MethodGet, path: "/" + repository + "/blobs/" + blob.String(),
		caps: docker.HostCapabilityPull, scope: pullScope(repository),
		header: http.Header{"Range": {fmt.Sprintf("bytes=%d-%d", off, off+length-1)}},
	})
	if err != nil {
		return nil, err
	}
	u := resp.Request.URL.Redacted()
	switch resp.StatusCode {
	case http.StatusPartialContent:
		if start, ok := contentRangeStart(resp.Header.Get("Content-Range")); !ok || start != off {
			drain(resp)
			return nil, fmt.Errorf("GET %s: the registry answered range %q for bytes %d-", u, resp.Header.Get("Content-Range"), off)
		}
	case http.StatusOK:
		if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
			drain(resp)
			return nil, fmt.Errorf("GET %s: skipping to %d: %w", u, off, err)
		}
	default:
		return nil, readRegistryError(resp, false)
	}
	return struct {
		io.Reader
		io.Closer
	}{io.LimitReader(resp.Body, length), resp.Body}, nil
}

func pullScope(repository string) string { return "repository:" + repository + ":pull" }

// request is one registry request, before it is bound to an endpoint.
type request struct {
	method string
	// path follows the endpoint's /v2 path, or with starlight its root.
	path      string
	starlight bool
	caps      docker.HostCapabilities // what the endpoint must be trusted with
	scope     string                  // token scope
	body      []byte                  // nil for none
	header    http.Header
}

// do sends r to the endpoints of host that have r.caps, in order, until
// one answers something else than 404 or a transport error, and returns
// that answer (the last endpoint's, whatever it is) or an error: the
// first authentication error, else the first error. A mirror that is not
// a Starlight registry, or that cannot be reached, is logged once. The
// caller owns the response.
func (c *Client) do(ctx context.Context, host string, r request) (*http.Response, error) {
	endpoints, err := c.Hosts()(host)
	if err != nil {
		return nil, fmt.Errorf("registry %s: %w", host, err)
	}
	var candidates []docker.RegistryHost
	for _, e := range endpoints {
		if e.Capabilities.Has(r.caps) {
			candidates = append(candidates, e)
		}
	}
	if len(candidates) == 0 {
		return nil, fmt.Errorf("registry %s: no endpoint is configured for this request", host)
	}
	ctx = docker.WithScope(ctx, r.scope)
	var firstErr, authErr error
	for i, e := range candidates {
		resp, err := c.send(ctx, host, e, r)
		last := i == len(candidates)-1
		switch {
		case err == nil && (resp.StatusCode != http.StatusNotFound || last):
			return resp, nil
		case err == nil:
			err = readRegistryError(resp, r.starlight)
			var re *RegistryError
			if r.starlight && errors.As(err, &re) && re.Code == "" {
				c.warnOnce(ctx, host, e.Host, "not-starlight", func(l *log.Entry) {
					l.Warnf("registry endpoint %s of %s is not a Starlight registry (404 without an error code on %s): Starlight requests go to the next endpoint", e.Host, host, r.path)
				})
			}
		case ctx.Err() != nil:
			return nil, err
		default:
			var ae *AuthError
			var ce *CredentialError
			if (errors.As(err, &ae) || errors.As(err, &ce)) && authErr == nil {
				authErr = err
			}
			if !last {
				c.warnOnce(ctx, host, e.Host, "unreachable", func(l *log.Entry) {
					l.WithError(err).Warnf("registry endpoint %s of %s failed: requests go to the next endpoint", e.Host, host)
				})
			}
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	if authErr != nil {
		return nil, authErr
	}
	return nil, firstErr
}

// warnOnce logs with warn, once per endpoint of host and kind of problem
// for the life of c (and the clients derived from it).
func (c *Client) warnOnce(ctx context.Context, host, endpoint, kind string, warn func(*log.Entry)) {
	key := host + " " + endpoint + " " + kind
	c.cache.mu.Lock()
	seen := c.cache.warned[key]
	c.cache.warned[key] = true
	c.cache.mu.Unlock()
	if !seen {
		warn(log.G(ctx).WithFields(log.Fields{"host": host, "endpoint": endpoint}))
	}
}

// send sends r to endpoint e, authorized by e.Authorizer, answering one
// authentication challenge.
func (c *Client) send(ctx context.Context, host string, e docker.RegistryHost, r request) (*http.Response, error) {
	u := e.Scheme + "://" + e.Host
	if r.starlight {
		u += strings.TrimSuffix(e.Path, "/v2") + r.path
	} else {
		u += e.Path + r.path
		if isMirror(host, e.Host) {
			u += "?ns=" + url.QueryEscape(host)
		}
	}
	hc := &http.Client{}
	if e.Client != nil {
		*hc = *e.Client
	}
	if hc.CheckRedirect == nil && e.Authorizer != nil {
		// As containerd: a redirect (to blob storage) is authorized
		// for its own host, which usually means not at all.
		hc.CheckRedirect = func(req *http.Request, via []*http.Request) error {
			if len(via) >= 10 {
				return errors.New("stopped after 10 redirects")
			}
			return e.Authorizer.Authorize(ctx, req)
		}
	}
	var responses []*http.Response
	for {
		var body io.Reader
		if r.body != nil {
			body = bytes.NewReader(r.body)
		}
		req, err := http.NewRequestWithContext(ctx, r.method, u, body)
		if err != nil {
			return nil, err
		}
		for k, v := range c.header() {
			req.Header[k] = v
		}
		for k, v := range e.Header {
			req.Header[k] = append(req.Header[k], v...)
		}
		for k, v := range r.header {
			req.Header[k] = v
		}
		if e.Authorizer != nil {
			if err := e.Authorizer.Authorize(ctx, req); err != nil {
				err = fmt.Errorf("%s %s: authorizing: %w", r.method, u, err)
				if isAuthFailure(err) {
					err = c.authError(e.Host, err)
				}
				return nil, err
			}
		}
		resp, err := hc.Do(req)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", r.method, u, err)
		}
		if resp.StatusCode != http.StatusUnauthorized || e.Authorizer == nil {
			return resp, nil
		}
		if len(responses) > 0 {
			// Refused again: start over with the next request.
			if a, ok := e.Authorizer.(*renewingAuthorizer); ok {
				a.renew()
			}
			return nil, c.authError(e.Host, readRegistryError(resp, r.starlight))
		}
		responses = append(responses, resp)
		if err := e.Authorizer.AddResponses(ctx, responses); err != nil {
			return nil, c.authError(e.Host, fmt.Errorf("%w (%w)", readRegistryError(resp, r.starlight), err))
		}
		drain(resp)
	}
}

// isMirror tells whether endpoint serves references of host for another
// registry, which takes the namespace in the query (as in containerd).
func isMirror(host, endpoint string) bool {
	return endpoint != host && endpoint != ownEndpoint(host)
}

// contentRangeStart parses the first byte position of a Content-Range
// header ("bytes 10-19/100").
func contentRangeStart(h string) (int64, bool) {
	rest, ok := strings.CutPrefix(h, "bytes ")
	if !ok {
		return 0, false
	}
	first, _, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(first, 10, 64)
	return n, err == nil && n >= 0
}

func drain(resp *http.Response) {
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}

// hostCache keeps the first successful answer of hosts for every host
// name, until an Authorizer of the answer fails or the version of the
// host's configuration changes.
type hostCache struct {
	hosts   docker.RegistryHosts
	version func(host string) string
	mu      sync.Mutex
	known   map[string]*cachedHost
	warned  map[string]bool // see Client.warnOnce
}

type cachedHost struct {
	endpoints []docker.RegistryHost
	version   string // of the host's configuration, when asked
}

func (hc *hostCache) lookup(host string) ([]docker.RegistryHost, error) {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	var version string
	if hc.version != nil {
		version = hc.version(host)
	}
	if ch, ok := hc.known[host]; ok && ch.version == version {
		return ch.endpoints, nil
	}
	endpoints, err := hc.hosts(host)
	if err != nil {
		return nil, err
	}
	ch := &cachedHost{endpoints: make([]docker.RegistryHost, len(endpoints)), version: version}
	for i, e := range endpoints {
		if e.Authorizer != nil {
			e.Authorizer = &renewingAuthorizer{Authorizer: e.Authorizer, renew: func() { hc.forget(host, ch) }}
		}
		ch.endpoints[i] = e
	}
	hc.known[host] = ch
	return ch.endpoints, nil
}

// forget drops ch, if it is still the answer for host.
func (hc *hostCache) forget(host string, ch *cachedHost) {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if hc.known[host] == ch {
		delete(hc.known, host)
	}
}

// renewingAuthorizer makes the host cache ask for a new answer (so a new
// Authorizer) when authorization fails.
type renewingAuthorizer struct {
	docker.Authorizer
	renew func()
}

func (a *renewingAuthorizer) Authorize(ctx context.Context, req *http.Request) error {
	err := a.Authorizer.Authorize(ctx, req)
	if err != nil {
		a.renew()
	}
	return err
}
