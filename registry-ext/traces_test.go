package registryext

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/auth"
	"github.com/opencontainers/go-digest"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/crypto/bcrypt"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
)

// filesImage is a two-layer image: lib/f00..f09 in the base layer and
// app/main, app/conf plus the changed files of a version in the top one.
// Contents depend on version only where changed lists them.
func filesImage(t *testing.T, version string, changed ...string) *testImage {
	body := func(name string) string {
		if slices.Contains(changed, name) {
			return name + " of " + version + "\n"
		}
		return name + " content\n"
	}
	var base []tarFile
	base = append(base, tarFile{name: "lib/", typ: tar.TypeDir})
	for i := range 10 {
		name := fmt.Sprintf("lib/f%02d", i)
		base = append(base, tarFile{name: name, body: body(name)})
	}
	// The base layer is rebuilt for every version: its digest changes
	// even where its files do not.
	base = append(base, tarFile{name: "etc/", typ: tar.TypeDir}, tarFile{name: "etc/version", body: version})
	l1, d1 := tarLayer(t, base)
	l2, d2 := tarLayer(t, []tarFile{
		{name: "app/", typ: tar.TypeDir},
		{name: "app/main", body: body("app/main")},
		{name: "app/conf", body: body("app/conf")},
	})
	return buildImage(t, [][]byte{l1, l2}, []digest.Digest{d1, d2})
}

// bundleOf asks for the bundle of ref and returns its header.
func (r *testRegistry) bundleOf(ref string) *api.BundleHeader {
	r.t.Helper()
	resp, raw := r.do(http.MethodPost, "/starlight/delta", "application/json", []byte(`{"reference":"`+ref+`"}`))
	if resp.StatusCode != http.StatusOK {
		r.t.Fatalf("delta %s: %s %s", ref, resp.Status, raw)
	}
	br, err := bundle.NewReader(bytes.NewReader(raw))
	if err != nil {
		r.t.Fatal(err)
	}
	return br.Header()
}

// access returns the trace access of name in h, by the layer holding it.
func access(t *testing.T, h *api.BundleHeader, name string, ms int) api.TraceAccess {
	t.Helper()
	for _, l := range h.Layers {
		for _, e := range l.Entries {
			if e.Name == name {
				return api.TraceAccess{Layer: l.Digest, Name: name, Digest: e.Digest, TimeNS: int64(ms) * int64(time.Millisecond)}
			}
		}
	}
	t.Fatalf("no %s in the image", name)
	return api.TraceAccess{}
}

// contentOrder names the content frames of h by path, first holder wins,
// leaving out estargz's landmark file.
func contentOrder(h *api.BundleHeader) []string {
	byDigest := map[string]string{}
	for _, l := range h.Layers {
		for _, e := range l.Entries {
			if _, ok := byDigest[e.Digest]; !ok && e.Digest != "" {
				byDigest[e.Digest] = e.Name
			}
		}
	}
	var out []string
	for _, f := range h.Frames {
		if n := byDigest[f.Digest]; !strings.HasPrefix(n, ".no.prefetch") {
			out = append(out, n)
		}
	}
	return out
}

func (r *testRegistry) report(rep any) (int, api.TraceResult, api.Error) {
	r.t.Helper()
	body, err := json.Marshal(rep)
	if err != nil {
		r.t.Fatal(err)
	}
	resp, raw := r.do(http.MethodPost, "/starlight/v1/traces", "application/json", body)
	var res api.TraceResult
	var e api.Error
	if resp.StatusCode < 300 {
		if err := json.Unmarshal(raw, &res); err != nil {
			r.t.Fatalf("trace result %q: %v", raw, err)
		}
	} else if err := json.Unmarshal(raw, &e); err != nil {
		r.t.Fatalf("%s: error body is not JSON: %q", resp.Status, raw)
	}
	return resp.StatusCode, res, e
}

func counterValue(t *testing.T, result string) float64 {
	t.Helper()
	var m dto.Metric
	if err := traceReports.WithLabelValues(result).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func TestTraceReportOrdersBundles(t *testing.T) {
	r := newTestRegistry(t, registryConfig{})
	r.push("library/app", "v1", filesImage(t, "v1"))
	st := r.waitDone("library/app", "v1")
	h := r.bundleOf("library/app:v1")
	before := contentOrder(h)
	if before[0] != "lib/f00" {
		t.Fatalf("untraced bundle starts with %v, want layer and TOC order", before)
	}

	rep := api.TraceReport{
		Repository: "library/app", ManifestDigest: st.ConvertedDigest, Worker: "w1", Container: "c1",
		StartedAt: time.Unix(1_700_000_000, 0),
		Accesses: []api.TraceAccess{
			access(t, h, "app/main", 1), access(t, h, "lib/f07", 2), access(t, h, "app/conf", 3), access(t, h, "lib/f03", 4),
		},
	}
	accepted := counterValue(t, "accepted")
	code, res, e := r.report(rep)
	if code != http.StatusCreated || res.Existing || res.Accepted != 4 || !strings.HasPrefix(res.ID, "sha256:") {
		t.Fatalf("report: %d %+v %+v", code, res, e)
	}
	if got := counterValue(t, "accepted"); got != accepted+1 {
		t.Errorf("accepted counter %v, want %v", got, accepted+1)
	}

	// The same report again, even spelled differently (another time
	// zone, accesses in another order with the same times, a duplicate),
	// is the same trace.
	again := rep
	again.StartedAt = rep.StartedAt.In(time.FixedZone("X", 3600))
	again.Accesses = []api.TraceAccess{rep.Accesses[1], rep.Accesses[0], rep.Accesses[2], rep.Accesses[3], rep.Accesses[0]}
	again.Accesses[0], again.Accesses[1] = again.Accesses[1], again.Accesses[0]
	code, res2, e := r.report(again)
	if code != http.StatusOK || !res2.Existing || res2.ID != res.ID || res2.Accepted != 0 {
		t.Fatalf("repeated report: %d %+v %+v", code, res2, e)
	}
	if n, err := r.ext().DB().TraceCount(context.Background(), "library/app", st.ConvertedDigest); err != nil || n != 1 {
		t.Errorf("%d traces stored (%v), want 1", n, err)
	}

	after := contentOrder(r.bundleOf("library/app:v1"))
	want := []string{"app/main", "lib/f07", "app/conf", "lib/f03"}
	if !slices.Equal(after[:4], want) {
		t.Errorf("traced bundle starts with %v, want %v", after, want)
	}
	// Everything else keeps layer and TOC order.
	var rest []string
	for _, n := range before {
		if !slices.Contains(want, n) {
			rest = append(rest, n)
		}
	}
	if !slices.Equal(after[4:], rest) {
		t.Errorf("untraced rest %v, want %v", after[4:], rest)
	}
	// Deterministic: resume relies on it.
	if again := contentOrder(r.bundleOf("library/app:v1")); !slices.Equal(again, after) {
		t.Errorf("second bundle %v differs from %v", again, after)
	}

	// A second run that disagrees: consensus items stay first.
	rep2 := rep
	rep2.Container = "c2"
	rep2.Accesses = []api.TraceAccess{access(t, h, "lib/f07", 1), access(t, h, "app/main", 2),
		access(t, h, "lib/f05", 3), access(t, h, "app/conf", 4), access(t, h, "lib/f03", 5)}
	if code, _, e := r.report(rep2); code != http.StatusCreated {
		t.Fatalf("second report: %d %+v", code, e)
	}
	third := rep
	third.Container = "c3"
	if code, _, e := r.report(third); code != http.StatusCreated {
		t.Fatalf("third report: %d %+v", code, e)
	}
	// main 0,1,0 → 0; f07 1,0,1 → 1; conf 2,3,2 → 2; f05 2 (one run) → after conf;
	// f03 3,4,3 → 3.
	got := contentOrder(r.bundleOf("library/app:v1"))
	if want := []string{"app/main", "lib/f07", "app/conf", "lib/f05", "lib/f03"}; !slices.Equal(got[:5], want) {
		t.Errorf("merged order %v, want %v first", got, want)
	}
}

func TestTraceReportValidation(t *testing.T) {
	r := newTestRegistry(t, registryConfig{})
	r.push("library/app", "v1", filesImage(t, "v1"))
	st := r.waitDone("library/app", "v1")
	h := r.bundleOf("library/app:v1")
	r.push("library/other", "v1", filesImage(t, "other", "lib/f01"))
	other := r.waitDone("library/other", "v1")
	oh := r.bundleOf("library/other:v1")

	good := func() api.TraceReport {
		return api.TraceReport{Repository: "library/app", ManifestDigest: st.ConvertedDigest,
			Accesses: []api.TraceAccess{access(t, h, "app/main", 1), access(t, h, "lib/f01", 2)}}
	}
	rejected := counterValue(t, "rejected")
	for _, tc := range []struct {
		name   string
		edit   func(*api.TraceReport)
		code   int
		substr string
	}{
		{"unknown file", func(rep *api.TraceReport) {
			rep.Accesses[1].Name = "lib/nope"
			rep.Accesses = append(rep.Accesses, api.TraceAccess{Layer: rep.Accesses[0].Layer, Name: "app/ghost"})
		}, 400, `"lib/nope": no such file`},
		{"file of another layer", func(rep *api.TraceReport) { rep.Accesses[1].Layer = rep.Accesses[0].Layer }, 400, "no such file"},
		{"layer of another image", func(rep *api.TraceReport) { rep.Accesses[1] = access(t, oh, "etc/version", 2) }, 400, "not in the manifest"},
		{"wrong content digest", func(rep *api.TraceReport) { rep.Accesses[1].Digest = rep.Accesses[0].Digest }, 400, "does not match"},
		{"malformed digest", func(rep *api.TraceReport) { rep.Accesses[1].Digest = "sha256:xyz" }, 400, "digest"},
		{"offset not a chunk boundary", func(rep *api.TraceReport) { rep.Accesses[1].ChunkOffset = 7 }, 400, "chunk boundary"},
		{"negative time", func(rep *api.TraceReport) { rep.Accesses[1].TimeNS = -1 }, 400, "non-negative"},
		{"bad name", func(rep *api.TraceReport) { rep.Accesses[1].Name = "../etc/passwd" }, 400, "access 1"},
		{"no accesses", func(rep *api.TraceReport) { rep.Accesses = nil }, 400, "no accesses"},
		{"too many accesses", func(rep *api.TraceReport) {
			rep.Accesses = make([]api.TraceAccess, api.MaxTraceAccesses+1)
			for i := range rep.Accesses {
				rep.Accesses[i] = api.TraceAccess{Layer: "sha256:" + strings.Repeat("a", 64), Name: "f"}
			}
		}, 400, "at most"},
		{"unknown manifest", func(rep *api.TraceReport) { rep.ManifestDigest = digest.FromString("x").String() }, 404, "not a converted"},
		{"manifest of another repository", func(rep *api.TraceReport) { rep.ManifestDigest = other.ConvertedDigest }, 404, "not a converted"},
		{"unknown repository", func(rep *api.TraceReport) { rep.Repository = "library/nothing" }, 404, "not a converted"},
		{"invalid repository", func(rep *api.TraceReport) { rep.Repository = "Library/App" }, 400, "repository"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep := good()
			tc.edit(&rep)
			code, res, e := r.report(rep)
			if code != tc.code || !strings.Contains(e.Message, tc.substr) {
				t.Errorf("%d %+v %+v, want %d with %q", code, res, e, tc.code, tc.substr)
			}
		})
	}
	if got := counterValue(t, "rejected"); got < rejected+14 {
		t.Errorf("rejected counter %v, want at least %v", got, rejected+14)
	}

	for _, tc := range []struct {
		name, contentType, body string
		code                    int
	}{
		{"not JSON", "text/plain", "{}", http.StatusUnsupportedMediaType},
		{"unknown field", "application/json", `{"repository":"library/app","bogus":1}`, 400},
		{"trailing data", "application/json", `{"repository":"library/app"} {}`, 400},
		{"oversized", "application/json", `{"repository":"` + strings.Repeat("a", api.MaxTraceReportSize) + `"}`, http.StatusRequestEntityTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, raw := r.do(http.MethodPost, "/starlight/v1/traces", tc.contentType, []byte(tc.body))
			if resp.StatusCode != tc.code {
				t.Errorf("%s: %.200s, want %d", resp.Status, raw, tc.code)
			}
		})
	}
	// Nothing of the rejected reports was stored.
	if n, err := r.ext().DB().TraceCount(context.Background(), "library/app", st.ConvertedDigest); err != nil || n != 0 {
		t.Errorf("%d traces stored (%v) after rejected reports", n, err)
	}
	if code, _, e := r.report(good()); code != http.StatusCreated {
		t.Errorf("good report after the bad ones: %d %+v", code, e)
	}
}

func TestTraceInheritedByNextVersion(t *testing.T) {
	r := newTestRegistry(t, registryConfig{})
	r.push("library/app", "v1", filesImage(t, "v1"))
	st1 := r.waitDone("library/app", "v1")
	h1 := r.bundleOf("library/app:v1")
	rep := api.TraceReport{Repository: "library/app", ManifestDigest: st1.ConvertedDigest,
		Accesses: []api.TraceAccess{access(t, h1, "lib/f09", 1), access(t, h1, "app/conf", 2),
			access(t, h1, "lib/f04", 3), access(t, h1, "etc/version", 4)}}
	if code, _, e := r.report(rep); code != http.StatusCreated {
		t.Fatalf("report: %d %+v", code, e)
	}

	// v2 rebuilds both layers (every layer digest differs) and changes
	// app/conf and lib/f04. It has no trace of its own.
	r.push("library/app", "v2", filesImage(t, "v2", "app/conf", "lib/f04"))
	st2 := r.waitDone("library/app", "v2")
	h2 := r.bundleOf("library/app:v2")
	for i := range h1.Layers {
		if h1.Layers[i].Digest == h2.Layers[i].Digest {
			t.Fatalf("layer %d is shared between v1 and v2", i)
		}
	}
	if st2.ConvertedDigest == st1.ConvertedDigest {
		t.Fatal("v1 and v2 converted to the same manifest")
	}
	got := contentOrder(h2)
	// The paths v1 traced come first, in v1's order, changed or not.
	want := []string{"lib/f09", "app/conf", "lib/f04", "etc/version"}
	if !slices.Equal(got[:4], want) {
		t.Errorf("v2 bundle starts with %v, want %v", got, want)
	}
}

// aclController is an access controller for tests: users with a password
// and the actions they may take on any repository.
type aclController struct {
	users map[string]aclUser
}

type aclUser struct {
	pass    string
	actions []string
}

type aclChallenge struct{ msg string }

func (c aclChallenge) Error() string { return c.msg }
func (c aclChallenge) SetHeaders(r *http.Request, w http.ResponseWriter) {
	w.Header().Set("WWW-Authenticate", `Basic realm="starlight-acl"`)
}

func (a *aclController) Authorized(r *http.Request, access ...auth.Access) (*auth.Grant, error) {
	user, pass, ok := r.BasicAuth()
	u, known := a.users[user]
	if !ok || !known || u.pass != pass {
		return nil, aclChallenge{"authentication required"}
	}
	for _, acc := range access {
		if acc.Type == "repository" && !slices.Contains(u.actions, acc.Action) {
			return nil, aclChallenge{"insufficient scope: " + acc.Action}
		}
	}
	return &auth.Grant{User: auth.UserInfo{Name: user}}, nil
}

var registerACL sync.Once

func TestTraceReportAuth(t *testing.T) {
	registerACL.Do(func() {
		err := auth.Register("starlight-test-acl", func(map[string]any) (auth.AccessController, error) {
			return &aclController{users: map[string]aclUser{
				"pusher": {"p", []string{"pull", "push", "delete"}},
				"reader": {"r", []string{"pull"}},
			}}, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
	r := newTestRegistry(t, registryConfig{auth: configuration.Auth{"starlight-test-acl": configuration.Parameters{}}})
	r.user, r.pass = "pusher", "p"
	r.push("private/app", "v1", filesImage(t, "v1"))
	st := r.waitDone("private/app", "v1")
	h := r.bundleOf("private/app:v1")
	rep := api.TraceReport{Repository: "private/app", ManifestDigest: st.ConvertedDigest,
		Accesses: []api.TraceAccess{access(t, h, "app/main", 1)}}

	for _, tc := range []struct {
		name, user, pass string
		code             int
	}{
		{"no credentials", "", "", 401},
		{"wrong password", "pusher", "x", 401},
		{"pull only", "reader", "r", 401},
		{"push", "pusher", "p", 201},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r.user, r.pass = tc.user, tc.pass
			code, _, e := r.report(rep)
			if code != tc.code {
				t.Errorf("%d %+v, want %d", code, e, tc.code)
			}
			if code == 401 && e.Code != api.CodeUnauthorized {
				t.Errorf("401 with code %q", e.Code)
			}
		})
	}
	// The reader can still pull the bundle.
	r.user, r.pass = "reader", "r"
	if got := contentOrder(r.bundleOf("private/app:v1")); got[0] != "app/main" {
		t.Errorf("bundle for the reader starts with %v", got)
	}
}

func TestTraceReportHtpasswd(t *testing.T) {
	r := newTestRegistry(t, registryConfig{auth: htpasswdAuth(t, "alice", "s3cret")})
	r.user, r.pass = "alice", "s3cret"
	r.push("private/app", "v1", filesImage(t, "v1"))
	st := r.waitDone("private/app", "v1")
	h := r.bundleOf("private/app:v1")
	rep := api.TraceReport{Repository: "private/app", ManifestDigest: st.ConvertedDigest,
		Accesses: []api.TraceAccess{access(t, h, "app/main", 1)}}
	r.user, r.pass = "", ""
	resp, raw := r.do(http.MethodPost, "/starlight/v1/traces", "application/json", mustJSON(t, rep))
	if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") == "" {
		t.Errorf("without credentials: %s %v %s", resp.Status, resp.Header, raw)
	}
	r.user, r.pass = "alice", "s3cret"
	if code, _, e := r.report(rep); code != http.StatusCreated {
		t.Errorf("with credentials: %d %+v", code, e)
	}
}

func htpasswdAuth(t *testing.T, user, pass string) configuration.Auth {
	t.Helper()
	hash, err := bcrypt.GenerateFromPassword([]byte(pass), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "htpasswd")
	if err := os.WriteFile(path, []byte(user+":"+string(hash)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return configuration.Auth{"htpasswd": configuration.Parameters{"realm": "starlight-test", "path": path}}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
