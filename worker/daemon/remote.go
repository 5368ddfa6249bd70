package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/config"
)

// deltaPath is the registry route of a delta bundle.
const deltaPath = "/starlight/delta"

// Remote asks Starlight registries for delta bundles, and for ranges of
// layer blobs.
type Remote struct {
	hc *http.Client
	// IdleTimeout aborts a bundle stream that delivers no byte for that
	// long, so that a dead connection turns into a resume instead of a
	// pull that hangs forever.
	IdleTimeout time.Duration

	mu     sync.Mutex
	tokens map[string]string // host + scope → bearer token
}

// NewRemote returns a Remote with sane network timeouts. There is no
// overall timeout: a bundle streams for as long as it takes.
func NewRemote() *Remote {
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   30 * time.Second,
		ResponseHeaderTimeout: 5 * time.Minute, // the registry plans the delta first
		MaxIdleConnsPerHost:   4,
	}
	return &Remote{hc: &http.Client{Transport: tr}, IdleTimeout: 2 * time.Minute, tokens: make(map[string]string)}
}

// RegistryError is an error answer of the registry.
type RegistryError struct {
	Status  int
	Code    string
	Message string
}

func (e *RegistryError) Error() string {
	if e.Code != "" {
		return fmt.Sprintf("registry: %s: %s", e.Code, e.Message)
	}
	return fmt.Sprintf("registry: HTTP %d: %s", e.Status, e.Message)
}

// Delta posts req to the registry and returns the bundle stream. The
// stream is closed by the caller; it is aborted when ctx is done or when
// it stalls for IdleTimeout.
func (r *Remote) Delta(ctx context.Context, reg config.Registry, repository string, req api.DeltaRequest) (io.ReadCloser, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	resp, err := r.post(ctx, reg, deltaPath, "repository:"+repository+":pull", body, api.MediaTypeBundle)
	if err != nil {
		cancel()
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		defer cancel()
		return nil, readRegistryError(resp)
	}
	return newIdleReader(resp.Body, cancel, r.IdleTimeout), nil
}

// tracesPath is the registry route that takes startup traces.
const tracesPath = "/starlight/v1/traces"

// PostTrace uploads one trace report. The registry wants push access to
// the repository when authentication is on.
func (r *Remote) PostTrace(ctx context.Context, reg config.Registry, report *api.TraceReport) (*api.TraceResult, error) {
	body, err := json.Marshal(report)
	if err != nil {
		return nil, err
	}
	resp, err := r.post(ctx, reg, tracesPath, "repository:"+report.Repository+":pull,push", body, "application/json")
	if err != nil {
		return nil, err
	}
	// 201 for a new trace, 200 for one the registry already had.
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		return nil, readRegistryError(resp)
	}
	defer resp.Body.Close()
	var res api.TraceResult
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&res); err != nil {
		return nil, fmt.Errorf("POST %s: decoding the answer: %w", reg.BaseURL()+tracesPath, err)
	}
	return &res, nil
}

// post sends body to path on the registry (see do).
func (r *Remote) post(ctx context.Context, reg config.Registry, path, scope string, body []byte, accept string) (*http.Response, error) {
	return r.do(ctx, reg, http.MethodPost, path, scope, body, http.Header{
		"Content-Type": {"application/json"},
		"Accept":       {accept},
	})
}

// do sends a request to path on the registry, answering one
// authentication challenge (Basic with the configured credentials, or a
// token for scope from the registry's token service). body may be nil. The
// caller owns the response.
func (r *Remote) do(ctx context.Context, reg config.Registry, method, path, scope string, body []byte, header http.Header) (*http.Response, error) {
	u := reg.BaseURL() + path
	tokenKey := reg.Host + " " + scope
	send := func(auth string) (*http.Response, error) {
		var rd io.Reader
		if body != nil {
			rd = bytes.NewReader(body)
		}
		hr, err := http.NewRequestWithContext(ctx, method, u, rd)
		if err != nil {
			return nil, err
		}
		for k, v := range header {
			hr.Header[k] = v
		}
		if auth != "" {
			hr.Header.Set("Authorization", auth)
		}
		resp, err := r.hc.Do(hr)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", method, u, err)
		}
		return resp, nil
	}

	auth := r.cachedAuth(reg, tokenKey)
	resp, err := send(auth)
	if err == nil && resp.StatusCode == http.StatusUnauthorized {
		challenge := resp.Header.Get("WWW-Authenticate")
		drain(resp)
		var next string
		next, err = r.answer(ctx, reg, challenge, scope)
		if err == nil {
			if strings.HasPrefix(next, "Bearer ") {
				r.mu.Lock()
				r.tokens[tokenKey] = next
				r.mu.Unlock()
			}
			resp, err = send(next)
		}
	}
	return resp, err
}

// BlobRange returns length bytes of a blob of repository from offset off:
// a ranged GET of the registry's blob endpoint. A registry (or a storage
// redirect) that ignores the range is handled by skipping to off.
func (r *Remote) BlobRange(ctx context.Context, reg config.Registry, repository string, blob digest.Digest, off, length int64) (io.ReadCloser, error) {
	if off < 0 || length <= 0 {
		return nil, fmt.Errorf("blob %s: invalid range %d+%d", blob, off, length)
	}
	path := "/v2/" + repository + "/blobs/" + blob.String()
	resp, err := r.do(ctx, reg, http.MethodGet, path, "repository:"+repository+":pull", nil, http.Header{
		"Range": {fmt.Sprintf("bytes=%d-%d", off, off+length-1)},
	})
	if err != nil {
		return nil, err
	}
	switch resp.StatusCode {
	case http.StatusPartialContent:
		if start, ok := contentRangeStart(resp.Header.Get("Content-Range")); !ok || start != off {
			drain(resp)
			return nil, fmt.Errorf("GET %s: the registry answered range %q for bytes %d-", path, resp.Header.Get("Content-Range"), off)
		}
	case http.StatusOK:
		if _, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
			drain(resp)
			return nil, fmt.Errorf("GET %s: skipping to %d: %w", path, off, err)
		}
	default:
		return nil, readRegistryError(resp)
	}
	return struct {
		io.Reader
		io.Closer
	}{io.LimitReader(resp.Body, length), resp.Body}, nil
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

// cachedAuth is the Authorization sent on the first attempt: a token
// obtained earlier for this scope, or Basic credentials when configured
// (htpasswd registries accept them directly, saving a round trip).
func (r *Remote) cachedAuth(reg config.Registry, tokenKey string) string {
	r.mu.Lock()
	tok := r.tokens[tokenKey]
	r.mu.Unlock()
	if tok != "" {
		return tok
	}
	if reg.Username != "" {
		return basicAuth(reg)
	}
	return ""
}

func basicAuth(reg config.Registry) string {
	hr := http.Request{Header: http.Header{}}
	hr.SetBasicAuth(reg.Username, reg.Password)
	return hr.Header.Get("Authorization")
}

func (r *Remote) answer(ctx context.Context, reg config.Registry, challenge, scope string) (string, error) {
	scheme, params := parseChallenge(challenge)
	switch strings.ToLower(scheme) {
	case "basic":
		if reg.Username == "" {
			return "", fmt.Errorf("registry %s requires authentication: configure username and password for it", reg.Host)
		}
		return basicAuth(reg), nil
	case "bearer":
		tok, err := r.fetchToken(ctx, reg, params, scope)
		if err != nil {
			return "", fmt.Errorf("registry %s: getting a token: %w", reg.Host, err)
		}
		return "Bearer " + tok, nil
	default:
		return "", fmt.Errorf("registry %s requires authentication (challenge %q)", reg.Host, challenge)
	}
}

// fetchToken implements the Docker registry token flow: GET realm with
// service and scope, Basic credentials if any.
func (r *Remote) fetchToken(ctx context.Context, reg config.Registry, params map[string]string, scope string) (string, error) {
	realm := params["realm"]
	ru, err := url.Parse(realm)
	if err != nil || (ru.Scheme != "https" && ru.Scheme != "http") {
		return "", fmt.Errorf("invalid token realm %q", realm)
	}
	q := ru.Query()
	if s := params["service"]; s != "" {
		q.Set("service", s)
	}
	if s := params["scope"]; s != "" {
		scope = s
	}
	q.Set("scope", scope)
	ru.RawQuery = q.Encode()
	hr, err := http.NewRequestWithContext(ctx, http.MethodGet, ru.String(), nil)
	if err != nil {
		return "", err
	}
	if reg.Username != "" {
		hr.SetBasicAuth(reg.Username, reg.Password)
	}
	resp, err := r.hc.Do(hr)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return "", fmt.Errorf("token service: %s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	var tr struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&tr); err != nil {
		return "", fmt.Errorf("token service: %w", err)
	}
	if tr.Token == "" {
		tr.Token = tr.AccessToken
	}
	if tr.Token == "" {
		return "", errors.New("token service answered no token")
	}
	return tr.Token, nil
}

// parseChallenge parses `Scheme k="v", k2="v2"` (RFC 7235, the subset
// registries use).
func parseChallenge(h string) (string, map[string]string) {
	h = strings.TrimSpace(h)
	scheme, rest, _ := strings.Cut(h, " ")
	params := map[string]string{}
	for rest != "" {
		rest = strings.TrimLeft(rest, " ,")
		k, after, ok := strings.Cut(rest, "=")
		if !ok {
			break
		}
		k = strings.ToLower(strings.TrimSpace(k))
		var v string
		if strings.HasPrefix(after, `"`) {
			end := strings.Index(after[1:], `"`)
			if end < 0 {
				v, rest = after[1:], ""
			} else {
				v, rest = after[1:1+end], after[2+end:]
			}
		} else {
			v, rest, _ = strings.Cut(after, ",")
		}
		params[k] = strings.TrimSpace(v)
	}
	return scheme, params
}

func readRegistryError(resp *http.Response) error {
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	e := &RegistryError{Status: resp.StatusCode}
	var ae api.Error
	if json.Unmarshal(b, &ae) == nil && ae.Message != "" {
		e.Code, e.Message = ae.Code, ae.Message
	} else {
		// Distribution's own error format, or plain text.
		var de struct {
			Errors []struct{ Code, Message string } `json:"errors"`
		}
		if json.Unmarshal(b, &de) == nil && len(de.Errors) > 0 {
			e.Code, e.Message = de.Errors[0].Code, de.Errors[0].Message
		} else {
			e.Message = strings.TrimSpace(string(b))
			if e.Message == "" {
				e.Message = resp.Status
			}
		}
	}
	if resp.StatusCode == http.StatusNotFound && e.Code == "" {
		e.Message += " (is this a Starlight registry?)"
	}
	return e
}

func drain(resp *http.Response) {
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}

// idleReader cancels the request when no byte arrives for timeout.
type idleReader struct {
	rc     io.ReadCloser
	cancel context.CancelFunc
	timer  *time.Timer
	d      time.Duration
}

func newIdleReader(rc io.ReadCloser, cancel context.CancelFunc, d time.Duration) *idleReader {
	ir := &idleReader{rc: rc, cancel: cancel, d: d}
	if d > 0 {
		ir.timer = time.AfterFunc(d, cancel)
	}
	return ir
}

func (ir *idleReader) Read(p []byte) (int, error) {
	n, err := ir.rc.Read(p)
	if n > 0 && ir.timer != nil {
		ir.timer.Reset(ir.d)
	}
	return n, err
}

func (ir *idleReader) Close() error {
	if ir.timer != nil {
		ir.timer.Stop()
	}
	ir.cancel()
	return ir.rc.Close()
}
