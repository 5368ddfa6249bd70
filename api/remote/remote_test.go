package remote

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/remotes/docker"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

// fakeRegistry serves the Starlight routes and blobs of repository
// "team/app", behind no authentication, HTTP Basic (user set, token
// false) or Bearer tokens from its own token service (token true).
type fakeRegistry struct {
	t          *testing.T
	user, pass string
	token      bool
	blob       []byte
	// blobMode: "" honours Range, "ignore" answers 200 with the whole
	// blob, "wrong" answers 206 from byte 0.
	blobMode string
	// stall, if set, is waited for after the first bundle bytes.
	stall chan struct{}

	srv *httptest.Server

	mu          sync.Mutex
	tokenCalls  int    // requests to the token service
	tokenFail   int    // token requests still to fail with 503
	challenges  int    // 401 answers of the registry
	lastPath    string // last registry request, with its query
	tokenScopes []string
	// generation is in every token issued; a token of an older one has
	// expired.
	generation int
}

func startFake(t *testing.T, f *fakeRegistry) string {
	f.t = t
	f.srv = httptest.NewServer(f)
	t.Cleanup(f.srv.Close)
	return strings.TrimPrefix(f.srv.URL, "http://")
}

func (f *fakeRegistry) tokenFor(scopes []string) string {
	slices.Sort(scopes)
	return fmt.Sprintf("T-%d-%s", f.generation, strings.Join(scopes, "+"))
}

// serveToken is a Docker token service: OAuth POST (grant_type=password)
// or GET with Basic credentials, for the scopes asked.
func (f *fakeRegistry) serveToken(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.tokenCalls++
	fail := f.tokenFail > 0
	if fail {
		f.tokenFail--
	}
	f.mu.Unlock()
	if fail {
		http.Error(w, "token service down", http.StatusServiceUnavailable)
		return
	}
	var user, pass, service string
	var scopes []string
	switch r.Method {
	case http.MethodPost:
		r.ParseForm()
		if r.PostForm.Get("grant_type") != "password" {
			http.Error(w, "unsupported grant", http.StatusBadRequest)
			return
		}
		user, pass, service = r.PostForm.Get("username"), r.PostForm.Get("password"), r.PostForm.Get("service")
		scopes = strings.Fields(r.PostForm.Get("scope"))
	default:
		user, pass, _ = r.BasicAuth()
		service, scopes = r.URL.Query().Get("service"), r.URL.Query()["scope"]
	}
	if user != f.user || pass != f.pass || service != "reg" {
		http.Error(w, "denied", http.StatusUnauthorized)
		return
	}
	f.mu.Lock()
	f.tokenScopes = append(f.tokenScopes, strings.Join(scopes, " "))
	token := f.tokenFor(scopes)
	f.mu.Unlock()
	json.NewEncoder(w).Encode(map[string]any{"token": token, "access_token": token, "expires_in": 60})
}

// authorized checks the request for access to scope, and answers a
// challenge when it fails.
func (f *fakeRegistry) authorized(w http.ResponseWriter, r *http.Request, scope string) bool {
	ok := true
	var challenge string
	switch {
	case f.token:
		f.mu.Lock()
		current := fmt.Sprintf("Bearer T-%d-", f.generation)
		f.mu.Unlock()
		granted, fresh := strings.CutPrefix(r.Header.Get("Authorization"), current)
		ok = fresh && slices.Contains(strings.Split(granted, "+"), scope)
		challenge = `Bearer realm="` + f.srv.URL + `/token",service="reg",scope="` + scope + `"`
		if !fresh && strings.HasPrefix(r.Header.Get("Authorization"), "Bearer T-") {
			challenge += `,error="invalid_token"`
		}
	case f.user != "":
		u, p, basic := r.BasicAuth()
		ok = basic && u == f.user && p == f.pass
		challenge = `Basic realm="test"`
	}
	if !ok {
		f.mu.Lock()
		f.challenges++
		f.mu.Unlock()
		w.Header().Set("WWW-Authenticate", challenge)
		w.WriteHeader(http.StatusUnauthorized)
		json.NewEncoder(w).Encode(api.Error{Code: "UNAUTHORIZED", Message: "authentication required"})
	}
	return ok
}

func (f *fakeRegistry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/token" {
		f.serveToken(w, r)
		return
	}
	f.mu.Lock()
	f.lastPath = r.URL.RequestURI()
	f.mu.Unlock()
	switch {
	case r.Method == http.MethodPost && r.URL.Path == DeltaPath:
		if !f.authorized(w, r, "repository:team/app:pull") {
			return
		}
		var req api.DeltaRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil || r.Header.Get("Accept") != api.MediaTypeBundle {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		if req.Reference != "team/app:v1" {
			w.WriteHeader(http.StatusNotFound)
			json.NewEncoder(w).Encode(api.Error{Code: "NOT_FOUND", Message: "image " + req.Reference + " not found"})
			return
		}
		w.Header().Set("Content-Type", api.MediaTypeBundle)
		io.WriteString(w, "bundle bytes")
		if f.stall != nil {
			w.(http.Flusher).Flush()
			select {
			case <-f.stall:
			case <-r.Context().Done():
			}
		}
	case r.Method == http.MethodPost && r.URL.Path == TracesPath:
		if !f.authorized(w, r, "repository:team/app:pull,push") {
			return
		}
		var rep api.TraceReport
		if err := json.NewDecoder(r.Body).Decode(&rep); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusCreated)
		json.NewEncoder(w).Encode(api.TraceResult{ID: "sha256:1", Accepted: len(rep.Accesses)})
	case r.Method == http.MethodGet && r.URL.Path == "/v2/team/app/blobs/"+digest.FromBytes(f.blob).String():
		if !f.authorized(w, r, "repository:team/app:pull") {
			return
		}
		switch f.blobMode {
		case "ignore":
			w.Write(f.blob)
		case "wrong":
			w.Header().Set("Content-Range", "bytes 0-9/100")
			w.WriteHeader(http.StatusPartialContent)
			w.Write(f.blob[:10])
		default:
			http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(f.blob))
		}
	case strings.HasPrefix(r.URL.Path, "/v2/"):
		w.WriteHeader(http.StatusNotFound)
		json.NewEncoder(w).Encode(map[string]any{"errors": []api.Error{{Code: "BLOB_UNKNOWN", Message: "blob unknown to registry"}}})
	default:
		http.Error(w, "404 page not found", http.StatusNotFound)
	}
}

// newClient returns a Client that reaches host over HTTP with user and
// pass.
func newClient(user, pass string) *Client {
	return New(Options{Hosts: StaticHosts(func(string) HostConfig {
		return HostConfig{PlainHTTP: true, Username: user, Password: pass}
	})})
}

func delta(t *testing.T, c *Client, host string) string {
	t.Helper()
	body, err := c.Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"})
	if err != nil {
		t.Fatal(err)
	}
	defer body.Close()
	b, err := io.ReadAll(body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestBasicAuth(t *testing.T) {
	f := &fakeRegistry{user: "bob", pass: "pw"}
	host := startFake(t, f)
	c := newClient("bob", "pw")
	for range 2 {
		if b := delta(t, c, host); b != "bundle bytes" {
			t.Fatalf("body %q", b)
		}
	}
	// The second request sends the credentials without being asked.
	if f.challenges != 1 {
		t.Fatalf("%d challenges, want 1", f.challenges)
	}
}

func TestBearerToken(t *testing.T) {
	f := &fakeRegistry{user: "bob", pass: "pw", token: true}
	host := startFake(t, f)
	c := newClient("bob", "pw")
	for range 2 {
		if b := delta(t, c, host); b != "bundle bytes" {
			t.Fatalf("body %q", b)
		}
	}
	if f.tokenCalls != 1 || f.challenges != 1 {
		t.Fatalf("%d token requests and %d challenges, want 1 and 1 (the token is reused)", f.tokenCalls, f.challenges)
	}
	if f.tokenScopes[0] != "repository:team/app:pull" {
		t.Fatalf("token scopes %q", f.tokenScopes)
	}

	// A trace wants push access: a token of its own.
	res, err := c.PostTrace(context.Background(), host, &api.TraceReport{Repository: "team/app"})
	if err != nil {
		t.Fatal(err)
	}
	if res.ID != "sha256:1" {
		t.Fatalf("result %+v", res)
	}
	if f.tokenCalls != 2 || !strings.Contains(f.tokenScopes[1], "repository:team/app:pull,push") {
		t.Fatalf("%d token requests, scopes %q", f.tokenCalls, f.tokenScopes)
	}
}

// A token that expires mid-pull (the registry refuses it with
// invalid_token) is replaced at once: the refused request is sent again
// with a new token fetched with the same credentials.
func TestBearerTokenExpires(t *testing.T) {
	f := &fakeRegistry{user: "bob", pass: "pw", token: true}
	host := startFake(t, f)
	c := newClient("bob", "pw")
	if b := delta(t, c, host); b != "bundle bytes" {
		t.Fatalf("body %q", b)
	}
	f.mu.Lock()
	f.generation++ // every token issued so far expires
	f.mu.Unlock()
	// The request the registry refuses is sent again with a new token.
	if b := delta(t, c, host); b != "bundle bytes" {
		t.Fatalf("body %q", b)
	}
	if f.tokenCalls != 2 {
		t.Fatalf("%d token requests, want 2 (one new token after the expiry)", f.tokenCalls)
	}
}

func TestAnonymousToken(t *testing.T) {
	f := &fakeRegistry{token: true}
	host := startFake(t, f)
	if b := delta(t, newClient("", ""), host); b != "bundle bytes" {
		t.Fatalf("body %q", b)
	}
}

// A failed token fetch is not remembered: the next request starts over.
func TestTokenServiceRecovers(t *testing.T) {
	f := &fakeRegistry{user: "bob", pass: "pw", token: true, tokenFail: 1}
	host := startFake(t, f)
	c := newClient("bob", "pw")
	if _, err := c.Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"}); err == nil || !strings.Contains(err.Error(), "503") {
		t.Fatalf("error %v, want the token service's", err)
	}
	if b := delta(t, c, host); b != "bundle bytes" {
		t.Fatalf("body %q", b)
	}
}

func TestErrors(t *testing.T) {
	tests := []struct {
		name       string
		status     int
		header     string
		body       string
		user, pass string
		wantErr    string
	}{
		{"starlight error", 404, "", `{"code":"NOT_FOUND","message":"image app:v9 not found"}`, "", "", "registry: NOT_FOUND: image app:v9 not found"},
		{"distribution error", 403, "", `{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}`, "", "", "registry: DENIED: requested access"},
		{"not starlight", 404, "", "404 page not found", "", "", "is this a Starlight registry?"},
		{"empty body", 502, "", "", "", "", "registry: HTTP 502: Bad Gateway"},
		{"no credentials", 401, `Basic realm="x"`, `{"code":"UNAUTHORIZED","message":"authentication required"}`, "", "", "no basic auth credentials"},
		{"wrong credentials", 401, `Basic realm="x"`, `{"code":"UNAUTHORIZED","message":"authentication required"}`, "u", "bad", ": authentication failed: registry: UNAUTHORIZED: authentication required"},
		{"unknown scheme", 401, `Negotiate`, "", "u", "p", "failed to find supported auth scheme"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if tt.header != "" {
					w.Header().Set("WWW-Authenticate", tt.header)
				}
				w.WriteHeader(tt.status)
				io.WriteString(w, tt.body)
			}))
			defer srv.Close()
			host := strings.TrimPrefix(srv.URL, "http://")
			_, err := newClient(tt.user, tt.pass).Delta(context.Background(), host, "app", api.DeltaRequest{Reference: "app:v9"})
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
			}
			var re *RegistryError
			if !errors.As(err, &re) || re.Status != tt.status {
				t.Fatalf("error %v is not a RegistryError with status %d", err, tt.status)
			}
		})
	}
}

func TestWrongTokenCredentials(t *testing.T) {
	f := &fakeRegistry{user: "bob", pass: "pw", token: true}
	host := startFake(t, f)
	_, err := newClient("bob", "nope").Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"})
	if err == nil || !strings.Contains(err.Error(), "authorizing") {
		t.Fatalf("error %v, want a failed token fetch", err)
	}
}

func TestBlobRange(t *testing.T) {
	blob := []byte("0123456789abcdefghijklmnopqrstuvwxyz")
	d := digest.FromBytes(blob)
	for _, mode := range []string{"", "ignore"} {
		t.Run("mode="+mode, func(t *testing.T) {
			f := &fakeRegistry{user: "bob", pass: "pw", token: true, blob: blob, blobMode: mode}
			host := startFake(t, f)
			rc, err := newClient("bob", "pw").BlobRange(context.Background(), host, "team/app", d, 10, 5)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(rc)
			rc.Close()
			if string(b) != "abcde" {
				t.Fatalf("read %q", b)
			}
		})
	}
	f := &fakeRegistry{blob: blob, blobMode: "wrong"}
	host := startFake(t, f)
	c := newClient("", "")
	if _, err := c.BlobRange(context.Background(), host, "team/app", d, 10, 5); err == nil || !strings.Contains(err.Error(), `answered range "bytes 0-9/100"`) {
		t.Fatalf("error %v, want a range mismatch", err)
	}
	_, err := c.BlobRange(context.Background(), host, "team/app", digest.FromString("other"), 0, 5)
	var re *RegistryError
	if !errors.As(err, &re) || re.Status != 404 || re.Code != "BLOB_UNKNOWN" || strings.Contains(err.Error(), "Starlight") {
		t.Fatalf("error %v, want BLOB_UNKNOWN", err)
	}
	if _, err := c.BlobRange(context.Background(), host, "team/app", d, 0, 0); err == nil {
		t.Fatal("an empty range was accepted")
	}
}

func TestIdleTimeout(t *testing.T) {
	f := &fakeRegistry{stall: make(chan struct{})}
	defer close(f.stall)
	host := startFake(t, f)
	c := New(Options{IdleTimeout: 200 * time.Millisecond, Hosts: StaticHosts(func(string) HostConfig { return HostConfig{PlainHTTP: true} })})
	body, err := c.Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"})
	if err != nil {
		t.Fatal(err)
	}
	defer body.Close()
	done := make(chan error, 1)
	go func() {
		b, err := io.ReadAll(body)
		if string(b) != "bundle bytes" {
			err = errors.New("read " + string(b))
		}
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("read error %v, want the stream aborted", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a stalled stream was not aborted")
	}
}

func TestPlainHTTPOverride(t *testing.T) {
	host := startFake(t, &fakeRegistry{})
	c := New(Options{}) // HTTPS everywhere
	if _, err := c.Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"}); err == nil {
		t.Fatal("HTTPS to an HTTP server worked")
	}
	if b := delta(t, c.WithPlainHTTP(), host); b != "bundle bytes" {
		t.Fatalf("body %q", b)
	}
}

// Endpoints are tried in order; a mirror that lacks something passes the
// request on, and only the upstream takes traces.
func TestMirror(t *testing.T) {
	blob := []byte("some blob")
	mirror := &fakeRegistry{blob: blob}
	upstream := &fakeRegistry{blob: blob}
	mirrorHost, upstreamHost := startFake(t, mirror), startFake(t, upstream)
	mirror.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == DeltaPath || r.URL.Path == TracesPath {
			http.NotFound(w, r) // not a Starlight registry
			return
		}
		mirror.ServeHTTP(w, r)
	})
	c := New(Options{Hosts: func(host string) ([]docker.RegistryHost, error) {
		return []docker.RegistryHost{
			{Host: mirrorHost, Scheme: "http", Path: "/v2", Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve},
			{Host: upstreamHost, Scheme: "http", Path: "/v2", Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve | docker.HostCapabilityPush},
		}, nil
	}})
	if b := delta(t, c, "registry.example.com"); b != "bundle bytes" {
		t.Fatalf("body %q", b)
	}
	rc, err := c.BlobRange(context.Background(), "registry.example.com", "team/app", digest.FromBytes(blob), 5, 4)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(rc)
	rc.Close()
	if string(b) != "blob" || !strings.HasSuffix(mirror.lastPath, "?ns=registry.example.com") || upstream.lastPath != DeltaPath {
		t.Fatalf("read %q; mirror saw %q, upstream %q", b, mirror.lastPath, upstream.lastPath)
	}
	if _, err := c.PostTrace(context.Background(), "registry.example.com", &api.TraceReport{Repository: "team/app"}); err != nil {
		t.Fatal(err)
	}
	if upstream.lastPath != TracesPath {
		t.Fatalf("upstream saw %q", upstream.lastPath)
	}
}

func TestContentRangeStart(t *testing.T) {
	for h, want := range map[string]int64{"bytes 10-19/100": 10, "bytes 0-0/*": 0, "bytes -1-2/3": -1, "items 1-2/3": -1, "": -1} {
		got, ok := contentRangeStart(h)
		if !ok {
			got = -1
		}
		if got != want {
			t.Errorf("%q: %d, want %d", h, got, want)
		}
	}
}

// TestDeltaBusyRetry: a 503 with Retry-After is waited out and asked
// again, a bounded number of times; a 503 without it is an error at once.
func TestDeltaBusyRetry(t *testing.T) {
	for _, tc := range []struct {
		name       string
		busy       int    // 503 answers before the bundle
		retryAfter string // "" for none
		wantCalls  int
		wantErr    bool
	}{
		{"busy once", 1, "1", 2, false},
		{"HTTP date", 1, time.Now().Add(-time.Minute).UTC().Format(http.TimeFormat), 2, false},
		{"busy for good", 100, "1", busyRetries + 1, true},
		{"unavailable", 1, "", 1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if testing.Short() && tc.busy > 1 {
				t.Skip("waits for every retry")
			}
			var mu sync.Mutex
			calls := 0
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				calls++
				n := calls
				mu.Unlock()
				if n <= tc.busy {
					if tc.retryAfter != "" {
						w.Header().Set("Retry-After", tc.retryAfter)
					}
					api.WriteError(w, http.StatusServiceUnavailable, api.CodeUnavailable, "busy")
					return
				}
				w.Header().Set("Content-Type", api.MediaTypeBundle)
				w.Write([]byte("bundle"))
			}))
			defer srv.Close()
			host := strings.TrimPrefix(srv.URL, "http://")
			c := New(Options{}).WithPlainHTTP()
			rc, err := c.Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"})
			if (err != nil) != tc.wantErr {
				t.Fatalf("Delta: %v, want error %v", err, tc.wantErr)
			}
			if err == nil {
				b, _ := io.ReadAll(rc)
				rc.Close()
				if string(b) != "bundle" {
					t.Errorf("body %q", b)
				}
			} else {
				var re *RegistryError
				if !errors.As(err, &re) || re.Status != http.StatusServiceUnavailable {
					t.Errorf("error %v, want the registry's 503", err)
				}
			}
			if calls != tc.wantCalls {
				t.Errorf("%d requests, want %d", calls, tc.wantCalls)
			}
		})
	}
}
