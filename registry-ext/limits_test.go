package registryext

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/auth"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
)

// repoACL is an access controller for tests: users with a password and,
// per repository, the actions they may take ("*" for any repository).
type repoACL struct {
	users map[string]repoUser
}

type repoUser struct {
	pass  string
	repos map[string][]string
}

func (a *repoACL) Authorized(r *http.Request, access ...auth.Access) (*auth.Grant, error) {
	user, pass, ok := r.BasicAuth()
	u, known := a.users[user]
	if !ok || !known || u.pass != pass {
		return nil, aclChallenge{"authentication required"}
	}
	for _, acc := range access {
		if acc.Type != "repository" {
			continue
		}
		if !slices.Contains(u.repos[acc.Name], acc.Action) && !slices.Contains(u.repos["*"], acc.Action) {
			return nil, aclChallenge{fmt.Sprintf("insufficient scope: %s on %s", acc.Action, acc.Name)}
		}
	}
	return &auth.Grant{User: auth.UserInfo{Name: user}}, nil
}

var registerRepoACL sync.Once

func repoACLAuth(t *testing.T) configuration.Auth {
	registerRepoACL.Do(func() {
		err := auth.Register("starlight-test-repo-acl", func(map[string]any) (auth.AccessController, error) {
			return &repoACL{users: map[string]repoUser{
				"pusher": {"p", map[string][]string{"*": {"pull", "push"}}},
				"app":    {"a", map[string][]string{"tok/app": {"pull"}}},
				"both":   {"b", map[string][]string{"tok/app": {"pull"}, "tok/secret": {"pull"}}},
			}}, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
	return configuration.Auth{"starlight-test-repo-acl": configuration.Parameters{}}
}

// TestHaveCountsOnlyPullableLayers is the cross-repository probe: a
// caller who may pull tok/app only lists a layer of tok/secret (which
// holds a file of tok/app) in have. The bundle must be byte for byte the
// bundle without it; a caller who may pull both gets the dedup.
func TestHaveCountsOnlyPullableLayers(t *testing.T) {
	r := newTestRegistry(t, registryConfig{auth: repoACLAuth(t)})
	r.user, r.pass = "pusher", "p"
	shared := strings.Repeat("the same bytes in both repositories\n", 50)
	secretLayer, secretDiff := tarLayer(t, []tarFile{{name: "srv/", typ: tar.TypeDir}, {name: "srv/key", body: shared}})
	appLayer, appDiff := tarLayer(t, []tarFile{{name: "app/", typ: tar.TypeDir}, {name: "app/data", body: shared},
		{name: "app/main", body: "main of app\n"}})
	r.push("tok/secret", "v1", buildImage(t, [][]byte{secretLayer}, []digest.Digest{secretDiff}))
	r.push("tok/app", "v1", buildImage(t, [][]byte{appLayer}, []digest.Digest{appDiff}))
	secret := r.waitDone("tok/secret", "v1")
	r.waitDone("tok/app", "v1")
	m, _ := r.manifest("tok/secret", secret.ConvertedTag)
	foreign := m.Layers[0].Digest.String()

	delta := func(have ...string) (api.BundleStats, []byte) {
		t.Helper()
		body := mustJSON(t, api.DeltaRequest{Reference: "tok/app:v1", Have: have, HeaderVersion: bundle.Version})
		resp, raw := r.do(http.MethodPost, "/starlight/delta", "application/json", body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("delta as %s: %s %s", r.user, resp.Status, raw)
		}
		br, err := bundle.NewReader(bytes.NewReader(raw))
		if err != nil {
			t.Fatal(err)
		}
		return br.Header().Stats, raw
	}
	r.user, r.pass = "app", "a"
	without, rawWithout := delta()
	with, rawWith := delta(foreign)
	if with.DedupBytes != 0 || !bytes.Equal(rawWith, rawWithout) {
		t.Errorf("pull on tok/app only: a layer of tok/secret in have changed the bundle (dedup %d bytes, %d vs %d bytes)",
			with.DedupBytes, len(rawWith), len(rawWithout))
	}
	if without.DedupBytes != 0 {
		t.Fatalf("dedup %d bytes with nothing held", without.DedupBytes)
	}
	r.user, r.pass = "both", "b"
	if st, _ := delta(foreign); st.DedupBytes == 0 {
		t.Error("pull on both repositories: the held layer of tok/secret was not deduplicated against")
	}
	// Unknown layers change nothing either.
	r.user, r.pass = "app", "a"
	if _, raw := delta(digest.FromString("never indexed").String(), foreign); !bytes.Equal(raw, rawWithout) {
		t.Error("an unknown layer in have changed the bundle")
	}
}

// TestAuthBeforeParsing: with auth on, an anonymous caller is asked for
// credentials on every /starlight/ route, whatever is wrong with the
// request; with credentials the same requests get their 4xx.
func TestAuthBeforeParsing(t *testing.T) {
	r := newTestRegistry(t, registryConfig{auth: htpasswdAuth(t, "alice", "s3cret")})
	for _, tc := range []struct {
		name, method, path, contentType, body string
		authed                                int
	}{
		{"bad repository", "GET", "/starlight/v1/images/Bad/Repo/v1", "", "", 400},
		{"bad tag", "GET", "/starlight/v1/images/library/app/-bad", "", "", 400},
		{"bad job state", "GET", "/starlight/v1/jobs?state=odd", "", "", 400},
		{"delta malformed body", "POST", "/starlight/delta", "application/json", "{not json", 400},
		{"delta bad repository", "POST", "/starlight/delta", "application/json", `{"reference":"Bad/Repo:v1"}`, 400},
		{"delta wrong content type", "POST", "/starlight/delta", "text/plain", `{}`, 415},
		{"delta bad have", "POST", "/starlight/delta", "application/json", `{"reference":"library/app:v1","have":["x"]}`, 400},
		{"trace malformed body", "POST", "/starlight/v1/traces", "application/json", "[", 400},
		{"trace bad repository", "POST", "/starlight/v1/traces", "application/json",
			`{"repository":"Bad/Repo","manifestDigest":"sha256:` + strings.Repeat("0", 64) + `","accesses":[]}`, 400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, user := range []string{"", "alice"} {
				r.user, r.pass = user, "s3cret"
				resp, body := r.do(tc.method, tc.path, tc.contentType, []byte(tc.body))
				want := tc.authed
				if user == "" {
					want = http.StatusUnauthorized
				}
				if resp.StatusCode != want {
					t.Errorf("as %q: %d, want %d: %s", user, resp.StatusCode, want, body)
				}
				var e api.Error
				if json.Unmarshal(body, &e) != nil || e.Code == "" {
					t.Errorf("as %q: not an api.Error: %s", user, body)
				}
				if want == 401 && resp.Header.Get("WWW-Authenticate") == "" {
					t.Errorf("401 without a challenge")
				}
			}
		})
	}
}

// TestBundleStreamLimit: with every stream slot taken, a delta request
// waits for the queue wait and is then told to retry (503, UNAVAILABLE,
// Retry-After); beyond the queue it is told at once; once a slot is free
// it is served.
func TestBundleStreamLimit(t *testing.T) {
	r := newTestRegistry(t, registryConfig{options: map[string]any{"maxbundlestreams": 1, "bundlequeuewait": "200ms"}})
	r.push("library/app", "v1", twoLayerImage(t, "limit"))
	r.waitDone("library/app", "v1")
	h := r.srv.Config.Handler.(*handler)
	body := []byte(`{"reference":"library/app:v1"}`)

	h.bundles.slots <- struct{}{} // the one stream slot, taken
	busy := func(what string) {
		t.Helper()
		resp, raw := r.do(http.MethodPost, "/starlight/delta", "application/json", body)
		var e api.Error
		json.Unmarshal(raw, &e)
		if resp.StatusCode != http.StatusServiceUnavailable || e.Code != api.CodeUnavailable {
			t.Fatalf("%s: %s %s, want 503 UNAVAILABLE", what, resp.Status, raw)
		}
		if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || s < 1 {
			t.Errorf("%s: Retry-After %q", what, resp.Header.Get("Retry-After"))
		}
	}
	busy("waited in the queue")
	for range cap(h.bundles.queue) {
		h.bundles.queue <- struct{}{}
	}
	busy("queue full")
	for range cap(h.bundles.queue) {
		<-h.bundles.queue
	}
	<-h.bundles.slots
	if resp, raw := r.do(http.MethodPost, "/starlight/delta", "application/json", body); resp.StatusCode != http.StatusOK {
		t.Fatalf("with a free slot: %s %.200s", resp.Status, raw)
	}
	if len(h.bundles.slots) != 0 {
		t.Error("a served stream did not give its slot back")
	}
}

// TestTraceReportDecodedWithinLimits: a report is refused as soon as it
// goes past a limit, while it is decoded: one access too many, a value
// too long.
func TestTraceReportDecodedWithinLimits(t *testing.T) {
	r := newTestRegistry(t, registryConfig{})
	layer := "sha256:" + strings.Repeat("a", 64)
	var many bytes.Buffer
	many.WriteString(`{"repository":"library/app","manifestDigest":"sha256:` + strings.Repeat("0", 64) + `","accesses":[`)
	for i := range api.MaxTraceAccesses + 1 {
		if i > 0 {
			many.WriteByte(',')
		}
		fmt.Fprintf(&many, `{"layer":%q,"name":"f%d","timeNs":%d}`, layer, i, i)
	}
	many.WriteString(`]}`)
	long := `{"repository":"library/app","worker":"` + strings.Repeat("w", 1<<20) + `"}`
	badAccess := `{"repository":"library/app","accesses":[{"layer":"sha256:zz","name":"a","timeNs":1}` +
		strings.Repeat(`,{"layer":"`+layer+`","name":"a","timeNs":1}`, 1000) + `]}`
	for _, tc := range []struct {
		name, body, msg string
		status          int
	}{
		{"one access too many", many.String(), "more than", 400},
		{"a value too long", long, "larger than", 413},
		{"an invalid access", badAccess, "access 0: layer", 400},
		{"unknown field", `{"repository":"library/app","extra":1}`, "unknown field", 400},
		{"trailing data", `{"repository":"library/app"} {}`, "trailing data", 400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, raw := r.do(http.MethodPost, "/starlight/v1/traces", "application/json", []byte(tc.body))
			var e api.Error
			json.Unmarshal(raw, &e)
			if resp.StatusCode != tc.status || !strings.Contains(e.Message, tc.msg) {
				t.Errorf("%s %+v, want %d mentioning %q", resp.Status, e, tc.status, tc.msg)
			}
		})
	}
}

func TestParseBundleOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   map[string]any
		ok   bool
	}{
		{"all", map[string]any{"maxbundlestreams": 8, "bundlequeuewait": "2s", "bundlewritetimeout": "30s",
			"maxbundleplans": 1, "plancachesize": 0}, true},
		{"no streams", map[string]any{"maxbundlestreams": 0}, false},
		{"no plans", map[string]any{"maxbundleplans": 0}, false},
		{"negative wait", map[string]any{"bundlequeuewait": "-1s"}, false},
		{"tiny write timeout", map[string]any{"bundlewritetimeout": "10ms"}, false},
		{"negative cache", map[string]any{"plancachesize": -1}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, err := ParseOptions(tc.in)
			if (err == nil) != tc.ok {
				t.Fatalf("err = %v", err)
			}
			if !tc.ok {
				return
			}
			want := Options{MaxBundleStreams: 8, BundleQueueWait: 2 * time.Second, BundleWriteTimeout: 30 * time.Second,
				MaxBundlePlans: 1, PlanCacheSize: 0}
			if o.MaxBundleStreams != want.MaxBundleStreams || o.BundleQueueWait != want.BundleQueueWait ||
				o.BundleWriteTimeout != want.BundleWriteTimeout || o.MaxBundlePlans != want.MaxBundlePlans || o.PlanCacheSize != 0 {
				t.Errorf("options %+v", o)
			}
			if l := planLimits(o); l.CacheSize >= 0 || l.Plans != 1 || l.WriteTimeout != 30*time.Second {
				t.Errorf("plancachesize 0 gives planner limits %+v, want no cache", l)
			}
		})
	}
	if o, _ := ParseOptions(nil); o.MaxBundleStreams != DefaultMaxBundleStreams || o.PlanCacheSize != DefaultPlanCacheSize {
		t.Errorf("defaults %+v", o)
	}
}
