package registryext

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd"
	"github.com/distribution/distribution/v3/registry/handlers"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	dto "github.com/prometheus/client_model/go"
	"github.com/sirupsen/logrus"
	"golang.org/x/crypto/bcrypt"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
	"github.com/starlight-project/starlight/convert"
	"github.com/starlight-project/starlight/schema"
)

func init() {
	os.Setenv("OTEL_TRACES_EXPORTER", "none")
}

// testDSN returns a fresh index database: a new database on the
// PostgreSQL server STARLIGHT_TEST_POSTGRES names, SQLite otherwise.
func testDSN(t *testing.T) string {
	t.Helper()
	admin := os.Getenv("STARLIGHT_TEST_POSTGRES")
	if admin == "" {
		return filepath.Join(t.TempDir(), "index.db")
	}
	db, err := sql.Open("pgx", admin)
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("starlight_test_%d", time.Now().UnixNano())
	if _, err := db.Exec("CREATE DATABASE " + name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		db.Exec("DROP DATABASE " + name + " WITH (FORCE)")
		db.Close()
	})
	u, err := url.Parse(admin)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	return u.String()
}

// testRegistry is a distribution app with the extension, on httptest.
type testRegistry struct {
	t      *testing.T
	srv    *httptest.Server
	app    *handlers.App
	root   string // storage root
	dsn    string
	user   string
	pass   string
	closed bool
}

type registryConfig struct {
	root    string         // storage root; a new temp dir when ""
	dsn     string         // database; a new temp file when ""
	options map[string]any // extra middleware options
	auth    configuration.Auth
}

func newTestRegistry(t *testing.T, rc registryConfig) *testRegistry {
	t.Helper()
	if rc.root == "" {
		rc.root = filepath.Join(t.TempDir(), "storage")
	}
	if rc.dsn == "" {
		rc.dsn = testDSN(t)
	}
	opts := map[string]any{"database": rc.dsn, "workers": 2, "digestdelay": "0s", "retrydelay": "0s"}
	for k, v := range rc.options {
		opts[k] = v
	}
	config := &configuration.Configuration{
		Storage: configuration.Storage{
			"filesystem": configuration.Parameters{"rootdirectory": rc.root},
			"delete":     configuration.Parameters{"enabled": true},
		},
		Auth: rc.auth,
		Middleware: map[string][]configuration.Middleware{
			"registry":   {{Name: Name, Options: opts}},
			"repository": {{Name: Name, Options: opts}},
		},
	}
	config.HTTP.Secret = "starlight-test"
	config.Log.Level = "warn"
	app := handlers.NewApp(context.Background(), config)
	r := &testRegistry{t: t, app: app, root: rc.root, dsn: rc.dsn}
	x := Lookup(rc.dsn)
	if x == nil {
		t.Fatal("no extension after NewApp")
	}
	r.srv = httptest.NewServer(Handler(config, app))
	t.Cleanup(r.close)
	return r
}

// close stops the server and the extension (gracefully: running jobs go
// back to the queue).
func (r *testRegistry) close() {
	if r.closed {
		return
	}
	r.closed = true
	r.srv.Close()
	if x := Lookup(r.dsn); x != nil {
		x.Close()
	}
	r.app.Shutdown()
}

func (r *testRegistry) ext() *Extension {
	x := Lookup(r.dsn)
	if x == nil {
		r.t.Fatal("extension not running")
	}
	return x
}

// execSQL runs a statement on the index database on a connection of its
// own, for a state no API of package schema reaches (schema keeps its SQL
// handle to itself). The statement must not use placeholders.
func (r *testRegistry) execSQL(query string) {
	r.t.Helper()
	driver, dsn := "sqlite3", strings.TrimPrefix(r.dsn, "sqlite://")+"?_busy_timeout=10000"
	if strings.HasPrefix(r.dsn, "postgres://") || strings.HasPrefix(r.dsn, "postgresql://") {
		driver, dsn = "pgx", r.dsn
	}
	db, err := sql.Open(driver, dsn)
	if err != nil {
		r.t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(query); err != nil {
		r.t.Fatalf("%s: %v", query, err)
	}
}

func (r *testRegistry) do(method, path, contentType string, body []byte) (*http.Response, []byte) {
	r.t.Helper()
	u := path
	if !strings.HasPrefix(u, "http") {
		u = r.srv.URL + path
	}
	req, err := http.NewRequest(method, u, bytes.NewReader(body))
	if err != nil {
		r.t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	req.Header.Set("Accept", ocispec.MediaTypeImageManifest+", "+ocispec.MediaTypeImageIndex)
	if r.user != "" {
		req.SetBasicAuth(r.user, r.pass)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		r.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		r.t.Fatal(err)
	}
	return resp, b
}

func (r *testRegistry) pushBlob(repo string, b []byte) ocispec.Descriptor {
	r.t.Helper()
	resp, body := r.do(http.MethodPost, "/v2/"+repo+"/blobs/uploads/", "", nil)
	if resp.StatusCode != http.StatusAccepted {
		r.t.Fatalf("start upload: %s %s", resp.Status, body)
	}
	loc := resp.Header.Get("Location")
	sep := "?"
	if strings.Contains(loc, "?") {
		sep = "&"
	}
	d := digest.FromBytes(b)
	resp, body = r.do(http.MethodPut, loc+sep+"digest="+d.String(), "application/octet-stream", b)
	if resp.StatusCode != http.StatusCreated {
		r.t.Fatalf("finish upload: %s %s", resp.Status, body)
	}
	return ocispec.Descriptor{Digest: d, Size: int64(len(b))}
}

func (r *testRegistry) pushManifest(repo, ref, mediaType string, b []byte) digest.Digest {
	r.t.Helper()
	resp, body := r.do(http.MethodPut, "/v2/"+repo+"/manifests/"+ref, mediaType, b)
	if resp.StatusCode != http.StatusCreated {
		r.t.Fatalf("push manifest %s:%s: %s %s", repo, ref, resp.Status, body)
	}
	return digest.FromBytes(b)
}

// testImage is an image built in memory.
type testImage struct {
	layers   [][]byte // gzip blobs
	config   []byte
	manifest []byte
}

type tarFile struct {
	name string
	body string
	typ  byte
	link string
	mode int64 // of a regular file; 0644 when 0
}

func tarLayer(t *testing.T, files []tarFile) (gz []byte, diffID digest.Digest) {
	t.Helper()
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	for _, f := range files {
		h := &tar.Header{Name: f.name, Mode: 0o644, Size: int64(len(f.body)), Typeflag: f.typ, Linkname: f.link,
			ModTime: time.Unix(1_600_000_000, 0), Format: tar.FormatPAX}
		switch f.typ {
		case tar.TypeDir:
			h.Mode, h.Size = 0o755, 0
		case tar.TypeSymlink:
			h.Size = 0
		case 0:
			h.Typeflag = tar.TypeReg
		}
		if f.mode != 0 {
			h.Mode = f.mode
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(f.body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	var gb bytes.Buffer
	zw := gzip.NewWriter(&gb)
	zw.Write(tb.Bytes())
	zw.Close()
	return gb.Bytes(), digest.FromBytes(tb.Bytes())
}

// buildImage makes an OCI image of gzip layers; a nil diffID (for a
// garbage layer) is replaced by the blob's digest.
func buildImage(t *testing.T, layers [][]byte, diffIDs []digest.Digest) *testImage {
	t.Helper()
	return buildImageConfig(t, layers, diffIDs, ocispec.ImageConfig{Cmd: []string{"/bin/sh"}})
}

// buildImageConfig is buildImage with the given runtime config.
func buildImageConfig(t *testing.T, layers [][]byte, diffIDs []digest.Digest, config ocispec.ImageConfig) *testImage {
	t.Helper()
	cfg := ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		Config:   config,
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
	}
	cb, _ := json.Marshal(cfg)
	m := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cb), Size: int64(len(cb))},
	}
	for _, l := range layers {
		m.Layers = append(m.Layers, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip,
			Digest: digest.FromBytes(l), Size: int64(len(l))})
	}
	mb, _ := json.Marshal(m)
	return &testImage{layers: layers, config: cb, manifest: mb}
}

func twoLayerImage(t *testing.T, salt string) *testImage {
	l1, d1 := tarLayer(t, []tarFile{
		{name: "etc/", typ: tar.TypeDir},
		{name: "etc/os-release", body: "NAME=starlight-test " + salt + "\n"},
		{name: "bin/", typ: tar.TypeDir},
		{name: "bin/sh", body: strings.Repeat("#!/bin/sh\n", 1000)},
	})
	l2, d2 := tarLayer(t, []tarFile{
		{name: "app/", typ: tar.TypeDir},
		{name: "app/main", body: "hello " + salt},
		{name: "app/link", typ: tar.TypeSymlink, link: "main"},
		{name: "etc/.wh.os-release"},
	})
	return buildImage(t, [][]byte{l1, l2}, []digest.Digest{d1, d2})
}

func (r *testRegistry) push(repo, ref string, im *testImage) digest.Digest {
	r.t.Helper()
	for _, l := range im.layers {
		r.pushBlob(repo, l)
	}
	r.pushBlob(repo, im.config)
	return r.pushManifest(repo, ref, ocispec.MediaTypeImageManifest, im.manifest)
}

func (r *testRegistry) status(repo, ref string) (int, api.ImageStatus, api.Error) {
	r.t.Helper()
	resp, body := r.do(http.MethodGet, "/starlight/v1/images/"+repo+"/"+ref, "", nil)
	var st api.ImageStatus
	var e api.Error
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(body, &st); err != nil {
			r.t.Fatalf("status body %q: %v", body, err)
		}
	} else if err := json.Unmarshal(body, &e); err != nil {
		r.t.Fatalf("%s: error body is not JSON: %q", resp.Status, body)
	}
	return resp.StatusCode, st, e
}

// waitDone polls the status API until the image is ready or failed.
func (r *testRegistry) waitDone(repo, ref string) api.ImageStatus {
	r.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		code, st, e := r.status(repo, ref)
		if code == http.StatusOK && (st.State == api.StateReady || st.State == api.StateFailed) {
			return st
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("%s:%s not done: %d %+v %+v", repo, ref, code, st, e)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitJob polls the queue until a job is ready or failed.
func (r *testRegistry) waitJob(repo string, dgst digest.Digest, tag string) *schema.Job {
	r.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		j, err := r.ext().DB().Job(context.Background(), repo, dgst.String(), tag)
		if err == nil && (j.State == api.StateReady || j.State == api.StateFailed) {
			return j
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("job %s@%s (%s) not done: %+v %v", repo, dgst, tag, j, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (r *testRegistry) manifest(repo, ref string) (ocispec.Manifest, int) {
	r.t.Helper()
	resp, body := r.do(http.MethodGet, "/v2/"+repo+"/manifests/"+ref, "", nil)
	var m ocispec.Manifest
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(body, &m); err != nil {
			r.t.Fatal(err)
		}
	}
	return m, resp.StatusCode
}

func TestConvertOnPush(t *testing.T) {
	r := newTestRegistry(t, registryConfig{})
	ctx := context.Background()
	im := twoLayerImage(t, "a")
	pushed := r.push("library/app", "v1", im)

	st := r.waitDone("library/app", "v1")
	if st.State != api.StateReady {
		t.Fatalf("state %s: %s", st.State, st.Error)
	}
	if st.Digest != pushed.String() || st.ConvertedTag != "v1-starlight" || st.ConvertedDigest == "" {
		t.Errorf("status %+v", st)
	}
	if st.Layers != 2 || st.Files < 8 {
		t.Errorf("status counts: %d layers, %d files", st.Layers, st.Files)
	}

	// The pushed tag is untouched; the converted tag is eStargz.
	if m, code := r.manifest("library/app", "v1"); code != http.StatusOK || m.Layers[0].Digest != digest.FromBytes(im.layers[0]) {
		t.Errorf("original manifest changed: %d", code)
	}
	conv, code := r.manifest("library/app", "v1-starlight")
	if code != http.StatusOK {
		t.Fatalf("converted tag: %d", code)
	}
	names := map[string]bool{}
	for i, l := range conv.Layers {
		if l.Annotations[convert.AnnotationTOCDigest] == "" || l.Annotations[convert.AnnotationUncompressedSize] == "" {
			t.Errorf("layer %d lacks eStargz annotations: %v", i, l.Annotations)
		}
		// The converted blob is pullable, and indexed.
		if resp, _ := r.do(http.MethodHead, "/v2/library/app/blobs/"+l.Digest.String(), "", nil); resp.StatusCode != http.StatusOK {
			t.Errorf("converted layer %d: %s", i, resp.Status)
		}
		layer, err := r.ext().DB().GetLayer(ctx, l.Digest.String())
		if err != nil {
			t.Fatalf("layer %d not indexed: %v", i, err)
		}
		for _, e := range layer.Entries {
			names[e.Name] = true
			if e.Name == "bin/sh" && (e.Digest == "" || len(e.Chunks) == 0) {
				t.Errorf("bin/sh indexed without content: %+v", e)
			}
		}
	}
	for _, n := range []string{"etc/os-release", "bin/sh", "app/main", "app/link", "etc/.wh.os-release"} {
		if !names[n] {
			t.Errorf("%s not indexed", n)
		}
	}
	if n := r.ext().conversions.Load(); n != 1 {
		t.Errorf("%d conversions, want 1", n)
	}
	var metric dto.Metric
	if err := conversionsTotal.Write(&metric); err != nil || metric.GetCounter().GetValue() < 1 {
		t.Errorf("conversions_total = %v (%v)", metric.GetCounter().GetValue(), err)
	}

	// Another tag of the same image: its converted tag, no new conversion.
	r.pushManifest("library/app", "v2", ocispec.MediaTypeImageManifest, im.manifest)
	if j := r.waitJob("library/app", pushed, "v2"); j.State != api.StateReady {
		t.Fatalf("retag job: %+v", j)
	}
	conv2, code := r.manifest("library/app", "v2-starlight")
	if code != http.StatusOK || conv2.Layers[1].Digest != conv.Layers[1].Digest {
		t.Errorf("v2-starlight: %d %v", code, conv2.Layers)
	}
	if n := r.ext().conversions.Load(); n != 1 {
		t.Errorf("retag converted again: %d conversions", n)
	}

	// Pushing converted images does not convert them again.
	_, convBytes := r.do(http.MethodGet, "/v2/library/app/manifests/v1-starlight", "", nil)
	convDigest := r.pushManifest("library/app", "copy", ocispec.MediaTypeImageManifest, convBytes)
	r.pushManifest("library/app", "again-starlight", ocispec.MediaTypeImageManifest, im.manifest)
	for _, tc := range []struct {
		dgst digest.Digest
		tag  string
	}{{convDigest, "copy"}, {pushed, "again-starlight"}} {
		if _, err := r.ext().DB().Job(ctx, "library/app", tc.dgst.String(), tc.tag); !errors.Is(err, schema.ErrNotFound) {
			t.Errorf("push of %s as %s queued a job: %v", tc.dgst, tc.tag, err)
		}
	}
	if _, code := r.manifest("library/app", "copy-starlight"); code != http.StatusNotFound {
		t.Errorf("copy-starlight exists: %d", code)
	}

	// The status of the converted image leads to the pushed one.
	if code, st, _ := r.status("library/app", conv2.Config.Digest.String()); code != http.StatusNotFound {
		t.Errorf("status of a config digest: %d %+v", code, st)
	}
	if code, st, _ := r.status("library/app", "v1-starlight"); code != http.StatusOK || st.Digest != pushed.String() {
		t.Errorf("status of the converted tag: %d %+v", code, st)
	}

	// A delta of the image as pushed streams a bundle of the converted one.
	body, _ := json.Marshal(api.DeltaRequest{Reference: "library/app:v1"})
	resp, raw := r.do(http.MethodPost, "/starlight/delta", "application/json", body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("delta: %s %s", resp.Status, raw)
	}
	br, err := bundle.NewReader(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	if h := br.Header(); h.ManifestDigest != st.ConvertedDigest || len(h.Layers) != 2 {
		t.Errorf("bundle header: %s, %d layers; want %s", h.ManifestDigest, len(h.Layers), st.ConvertedDigest)
	} else {
		// Each converted layer names the pushed layer it replaces.
		for i, l := range h.Layers {
			if want := digest.FromBytes(im.layers[i]).String(); l.OriginalDigest != want || l.Digest == want {
				t.Errorf("layer %d: %s replaces %q, want %s", i, l.Digest, l.OriginalDigest, want)
			}
		}
	}
}

func TestPushByDigest(t *testing.T) {
	r := newTestRegistry(t, registryConfig{})
	im := twoLayerImage(t, "bydigest")
	d := digest.FromBytes(im.manifest)
	r.push("team/svc", d.String(), im)
	st := r.waitDone("team/svc", d.String())
	if st.State != api.StateReady || st.Layers != 2 || st.ConvertedTag != "" {
		t.Fatalf("status %+v", st)
	}
	if _, code := r.manifest("team/svc", st.ConvertedDigest); code != http.StatusOK {
		t.Errorf("converted manifest: %d", code)
	}
}

func TestMultiPlatformIndex(t *testing.T) {
	// Platform manifests pushed by digest wait an hour: the index pushed
	// right after them converts them.
	r := newTestRegistry(t, registryConfig{options: map[string]any{"digestdelay": "1h"}})
	ctx := context.Background()
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex}
	var ims []*testImage
	for _, arch := range []string{"amd64", "arm64"} {
		im := twoLayerImage(t, arch)
		ims = append(ims, im)
		d := r.push("multi", digest.FromBytes(im.manifest).String(), im)
		idx.Manifests = append(idx.Manifests, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest,
			Digest: d, Size: int64(len(im.manifest)), Platform: &ocispec.Platform{OS: "linux", Architecture: arch}})
	}
	ib, _ := json.Marshal(idx)
	pushed := r.pushManifest("multi", "v1", ocispec.MediaTypeImageIndex, ib)

	st := r.waitDone("multi", "v1")
	if st.State != api.StateReady || st.Layers != 4 || st.ConvertedTag != "v1-starlight" {
		t.Fatalf("status %+v", st)
	}
	resp, body := r.do(http.MethodGet, "/v2/multi/manifests/v1-starlight", "", nil)
	var conv ocispec.Index
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &conv) != nil || len(conv.Manifests) != 2 {
		t.Fatalf("converted index: %s %s", resp.Status, body)
	}
	for i, m := range conv.Manifests {
		if m.Digest == idx.Manifests[i].Digest || m.Platform == nil || m.Platform.Architecture != idx.Manifests[i].Platform.Architecture {
			t.Errorf("converted index entry %d: %+v", i, m)
		}
	}

	// A delta picks the platform's manifest; an unknown platform is 404.
	for _, tc := range []struct {
		platform api.Platform
		want     digest.Digest
		code     int
	}{
		{api.Platform{}, conv.Manifests[0].Digest, 200},
		{api.Platform{OS: "linux", Architecture: "arm64"}, conv.Manifests[1].Digest, 200},
		{api.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}, conv.Manifests[1].Digest, 200},
		{api.Platform{OS: "linux", Architecture: "s390x"}, "", 404},
	} {
		req, _ := json.Marshal(api.DeltaRequest{Reference: "multi:v1", Platform: tc.platform})
		resp, raw := r.do(http.MethodPost, "/starlight/delta", "application/json", req)
		if resp.StatusCode != tc.code {
			t.Errorf("delta %s: %s %.200s", tc.platform, resp.Status, raw)
			continue
		}
		if tc.code != 200 {
			continue
		}
		br, err := bundle.NewReader(bytes.NewReader(raw))
		if err != nil {
			t.Fatal(err)
		}
		if got := br.Header().ManifestDigest; got != tc.want.String() {
			t.Errorf("delta %s: manifest %s, want %s", tc.platform, got, tc.want)
		}
	}

	// Until their own jobs run, the platform manifests are served from
	// the index.
	for i, m := range idx.Manifests {
		code, st, _ := r.status("multi", m.Digest.String())
		if code != http.StatusOK || st.State != api.StateReady || st.Digest != pushed.String() {
			t.Errorf("status of platform manifest %d: %d %+v", i, code, st)
		}
		req, _ := json.Marshal(api.DeltaRequest{Reference: "multi@" + m.Digest.String()})
		resp, raw := r.do(http.MethodPost, "/starlight/delta", "application/json", req)
		if resp.StatusCode != http.StatusOK {
			t.Errorf("delta of platform manifest %d: %s %.200s", i, resp.Status, raw)
		} else if br, err := bundle.NewReader(bytes.NewReader(raw)); err != nil || br.Header().ManifestDigest != conv.Manifests[i].Digest.String() {
			t.Errorf("delta of platform manifest %d: wrong bundle (%v)", i, err)
		} else {
			// As a CRI pull names it: the layers map to the pushed ones.
			for j, l := range br.Header().Layers {
				if want := digest.FromBytes(ims[i].layers[j]).String(); l.OriginalDigest != want {
					t.Errorf("platform manifest %d, layer %d replaces %q, want %s", i, j, l.OriginalDigest, want)
				}
			}
		}
	}

	// The platform manifests' own jobs reuse the index's conversion.
	r.execSQL(`UPDATE jobs SET not_before = 0`)
	r.ext().notify()
	for i, m := range idx.Manifests {
		if j := r.waitJob("multi", m.Digest, ""); j.State != api.StateReady {
			t.Fatalf("platform job %d: %+v", i, j)
		}
		st := r.waitDone("multi", m.Digest.String())
		if st.ConvertedDigest != conv.Manifests[i].Digest.String() {
			t.Errorf("platform %d converted to %s, want %s", i, st.ConvertedDigest, conv.Manifests[i].Digest)
		}
	}
	if n := r.ext().conversions.Load(); n != 1 {
		t.Errorf("%d conversions, want 1 (the index)", n)
	}
	if im, err := r.ext().DB().Image(ctx, "multi", pushed.String()); err != nil || im.MediaType != ocispec.MediaTypeImageIndex {
		t.Errorf("index image row: %+v %v", im, err)
	}
}

func TestBrokenLayers(t *testing.T) {
	tmp := filepath.Join(t.TempDir(), "spool", "deep")
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	r := newTestRegistry(t, registryConfig{options: map[string]any{"maxattempts": 2, "tempdir": tmp}})

	good, goodDiff := tarLayer(t, []tarFile{{name: "ok", body: "fine"}})
	garbage := bytes.Repeat([]byte("this is not gzip "), 100)
	escape, escapeDiff := tarLayer(t, []tarFile{{name: "../escape", body: "gotcha"}, {name: "../../escape", body: "gotcha"}})
	for _, tc := range []struct {
		name string
		im   *testImage
	}{
		{"garbage", buildImage(t, [][]byte{good, garbage}, []digest.Digest{goodDiff, digest.FromBytes(garbage)})},
		{"escape", buildImage(t, [][]byte{escape}, []digest.Digest{escapeDiff})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r.push("broken", tc.name, tc.im)
			st := r.waitDone("broken", tc.name)
			// An invalid layer fails at the first attempt: retrying cannot help.
			if st.State != api.StateFailed || st.Error == "" || st.Attempts != 1 {
				t.Fatalf("status %+v", st)
			}
			t.Logf("failure reason: %s", st.Error)
			// The pushed image stays pullable, nothing was tagged.
			if _, code := r.manifest("broken", tc.name); code != http.StatusOK {
				t.Errorf("original manifest: %d", code)
			}
			if _, code := r.manifest("broken", tc.name+"-starlight"); code != http.StatusNotFound {
				t.Errorf("converted tag of a failed image: %d", code)
			}
			// A delta of a failed image is a conflict, with the state.
			body, _ := json.Marshal(api.DeltaRequest{Reference: "broken:" + tc.name})
			resp, raw := r.do(http.MethodPost, "/starlight/delta", "application/json", body)
			var e api.Error
			if resp.StatusCode != http.StatusConflict || json.Unmarshal(raw, &e) != nil || !strings.Contains(e.Message, "failed") {
				t.Errorf("delta of a failed image: %s %s", resp.Status, raw)
			}
		})
	}
	for _, p := range []string{filepath.Join(tmp, "..", "escape"), filepath.Join(tmp, "..", "..", "escape"),
		filepath.Join(r.root, "..", "escape")} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s was written", p)
		}
	}
	// The registry keeps serving other pushes.
	r.push("broken", "fixed", twoLayerImage(t, "fixed"))
	if st := r.waitDone("broken", "fixed"); st.State != api.StateReady {
		t.Errorf("good image after broken ones: %+v", st)
	}
	failed, err := r.ext().DB().Jobs(context.Background(), 10, api.StateFailed)
	if err != nil || len(failed) != 2 {
		t.Errorf("failed jobs: %v %v", failed, err)
	}
}

func TestAPIErrors(t *testing.T) {
	r := newTestRegistry(t, registryConfig{})
	r.push("library/app", "v1", twoLayerImage(t, "errors"))
	r.waitDone("library/app", "v1")

	for _, tc := range []struct {
		name, method, path, body string
		code                     int
	}{
		{"unknown tag", "GET", "/starlight/v1/images/library/app/nope", "", 404},
		{"unknown repository", "GET", "/starlight/v1/images/no/such/repo/v1", "", 404},
		{"unknown digest", "GET", "/starlight/v1/images/library/app/sha256:" + strings.Repeat("0", 64), "", 404},
		{"bad digest", "GET", "/starlight/v1/images/library/app/sha256:xyz", "", 400},
		{"bad tag", "GET", "/starlight/v1/images/library/app/-bad", "", 400},
		{"bad repository", "GET", "/starlight/v1/images/Library/App/v1", "", 400},
		{"unknown route", "GET", "/starlight/v1/nothing", "", 404},
		{"wrong method", "GET", "/starlight/delta", "", 405},
		{"bad job state", "GET", "/starlight/v1/jobs?state=odd", "", 400},
		{"delta not json", "POST", "/starlight/delta", "{not json", 400},
		{"delta empty", "POST", "/starlight/delta", "", 400},
		{"delta unknown field", "POST", "/starlight/delta", `{"reference":"library/app:v1","extra":1}`, 400},
		{"delta trailing data", "POST", "/starlight/delta", `{"reference":"library/app:v1"} {}`, 400},
		{"delta bad reference", "POST", "/starlight/delta", `{"reference":"library/App:v1"}`, 400},
		{"delta bad digest", "POST", "/starlight/delta", `{"reference":"library/app@sha256:xyz"}`, 400},
		{"delta md5 reference", "POST", "/starlight/delta", `{"reference":"library/app@md5:d41d8cd98f00b204e9800998ecf8427e"}`, 400},
		{"delta no tag", "POST", "/starlight/delta", `{"reference":"library/app"}`, 400},
		{"delta bad have", "POST", "/starlight/delta", `{"reference":"library/app:v1","have":["sha256:zz"]}`, 400},
		{"delta md5 have", "POST", "/starlight/delta", `{"reference":"library/app:v1","have":["md5:d41d8cd98f00b204e9800998ecf8427e"]}`, 400},
		{"delta negative resume", "POST", "/starlight/delta", `{"reference":"library/app:v1","resume":-1}`, 400},
		{"delta half platform", "POST", "/starlight/delta", `{"reference":"library/app:v1","platform":{"os":"linux"}}`, 400},
		{"delta wrong type", "POST", "/starlight/delta", `{"reference":42}`, 400},
		{"delta unknown image", "POST", "/starlight/delta", `{"reference":"library/other:v1"}`, 404},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ct := ""
			if tc.method == "POST" {
				ct = "application/json"
			}
			resp, body := r.do(tc.method, tc.path, ct, []byte(tc.body))
			var e api.Error
			if err := json.Unmarshal(body, &e); err != nil || e.Code == "" || e.Message == "" {
				t.Errorf("body is not an api.Error: %q (%v)", body, err)
			}
			if resp.StatusCode != tc.code {
				t.Errorf("status %d, want %d: %s", resp.StatusCode, tc.code, body)
			}
			// Each status has one code here (docs/BUNDLE.md §2).
			if want := map[int]api.ErrorCode{400: api.CodeBadRequest, 404: api.CodeNotFound, 405: api.CodeMethodNotAllowed}[tc.code]; e.Code != want {
				t.Errorf("code %q, want %q", e.Code, want)
			}
			if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q", ct)
			}
		})
	}
	// The job list answers.
	resp, body := r.do("GET", "/starlight/v1/jobs?state=ready", "", nil)
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"library/app"`) {
		t.Errorf("jobs: %s %s", resp.Status, body)
	}
}

func TestAuth(t *testing.T) {
	hash, err := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	htpasswd := filepath.Join(t.TempDir(), "htpasswd")
	if err := os.WriteFile(htpasswd, []byte("alice:"+string(hash)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := newTestRegistry(t, registryConfig{auth: configuration.Auth{
		"htpasswd": configuration.Parameters{"realm": "starlight-test", "path": htpasswd},
	}})
	r.user, r.pass = "alice", "s3cret"
	r.push("private/app", "v1", twoLayerImage(t, "auth"))
	r.waitDone("private/app", "v1")

	deltaBody := `{"reference":"private/app:v1"}`
	for _, tc := range []struct {
		name, user, pass string
		code             int
	}{
		{"no credentials", "", "", 401},
		{"wrong password", "alice", "wrong", 401},
		{"valid", "alice", "s3cret", 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r.user, r.pass = tc.user, tc.pass
			for _, req := range []struct{ method, path, body string }{
				{"GET", "/starlight/v1/images/private/app/v1", ""},
				{"GET", "/starlight/v1/jobs", ""},
				{"POST", "/starlight/delta", deltaBody},
			} {
				resp, body := r.do(req.method, req.path, "application/json", []byte(req.body))
				if resp.StatusCode != tc.code {
					t.Errorf("%s %s: %d, want %d: %.200s", req.method, req.path, resp.StatusCode, tc.code, body)
				}
				if tc.code == 401 {
					var e api.Error
					if resp.Header.Get("WWW-Authenticate") == "" || json.Unmarshal(body, &e) != nil || e.Code != api.CodeUnauthorized {
						t.Errorf("%s %s: 401 without challenge or JSON: %v %s", req.method, req.path, resp.Header, body)
					}
				}
			}
			// /v2/ is guarded the same way.
			if resp, _ := r.do("GET", "/v2/private/app/manifests/v1", "", nil); resp.StatusCode != tc.code {
				t.Errorf("/v2/: %d, want %d", resp.StatusCode, tc.code)
			}
		})
	}
}

func TestRestartMidQueue(t *testing.T) {
	root := filepath.Join(t.TempDir(), "storage")
	dsn := testDSN(t)

	// Graceful: the registry stops with jobs queued or running.
	r1 := newTestRegistry(t, registryConfig{root: root, dsn: dsn, options: map[string]any{"workers": 1}})
	var refs []string
	for i := range 3 {
		ref := fmt.Sprintf("v%d", i)
		r1.push("library/restart", ref, twoLayerImage(t, ref))
		refs = append(refs, ref)
	}
	r1.close()

	r2 := newTestRegistry(t, registryConfig{root: root, dsn: dsn})
	for _, ref := range refs {
		if st := r2.waitDone("library/restart", ref); st.State != api.StateReady {
			t.Errorf("%s after restart: %+v", ref, st)
		}
		if _, code := r2.manifest("library/restart", ref+"-starlight"); code != http.StatusOK {
			t.Errorf("%s-starlight after restart: %d", ref, code)
		}
	}
	r2.close()

	// Crash: a registry leased a job and died without giving it back. Its
	// lease expires and the next registry retakes the job.
	im := twoLayerImage(t, "crash")
	r3 := newTestRegistry(t, registryConfig{root: root, dsn: dsn, options: map[string]any{"autoconvert": false}})
	pushed := r3.push("library/restart", "crash", im)
	r3.close()
	ctx := context.Background()
	db, err := schema.Open(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Enqueue(ctx, schema.Push{Repository: "library/restart", Digest: pushed.String(),
		MediaType: ocispec.MediaTypeImageManifest, Tag: "crash"}); err != nil {
		t.Fatal(err)
	}
	if j, err := db.LeaseJob(ctx, "crashed-registry", 2*time.Second); err != nil || j.Tag != "crash" {
		t.Fatalf("lease: %+v %v", j, err)
	}
	db.Close()

	r4 := newTestRegistry(t, registryConfig{root: root, dsn: dsn})
	st := r4.waitDone("library/restart", "crash")
	if st.State != api.StateReady {
		t.Fatalf("crashed job: %+v", st)
	}
	j, err := r4.ext().DB().Job(ctx, "library/restart", pushed.String(), "crash")
	if err != nil || j.Attempts != 2 {
		t.Errorf("retaken job: %+v %v", j, err)
	}
}

func TestParseOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   map[string]any
		ok   bool
	}{
		{"defaults", nil, true},
		{"all", map[string]any{"autoconvert": false, "database": "x.db", "tagsuffix": "-sl", "workers": 4,
			"tempdir": "/tmp", "chunksize": 65536, "maxattempts": 5, "retrydelay": "1m", "lease": 30, "digestdelay": "0s", "predict": false}, true},
		{"string predict", map[string]any{"predict": "no"}, false},
		{"string bool", map[string]any{"autoconvert": "false"}, true},
		{"unknown", map[string]any{"autoconvet": true}, false},
		{"bad suffix", map[string]any{"tagsuffix": "/x"}, false},
		{"no workers", map[string]any{"workers": 0}, false},
		{"bad type", map[string]any{"workers": "many"}, false},
		{"short lease", map[string]any{"lease": "10ms"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, err := ParseOptions(tc.in)
			if (err == nil) != tc.ok {
				t.Fatalf("err = %v", err)
			}
			if tc.ok && !strings.HasPrefix(o.Database, "sqlite:///") {
				t.Errorf("database %q not normalised", o.Database)
			}
			if tc.ok && o.Predict != (tc.in["predict"] == nil) {
				t.Errorf("predict %v with %v", o.Predict, tc.in["predict"])
			}
		})
	}
}

func TestMain(m *testing.M) {
	flag.Parse()
	pollInterval = 100 * time.Millisecond
	// distribution logs every request at info; keep test output readable.
	if !testing.Verbose() {
		logrus.SetLevel(logrus.WarnLevel)
	}
	os.Exit(m.Run())
}

// TestConfigFiles checks that the shipped configurations parse, enable the
// extension under both middleware kinds with the same options, and use the
// embedded defaults.
func TestConfigFiles(t *testing.T) {
	for _, path := range []string{"../config.yml.example", "../deploy/registry/config.yml"} {
		t.Run(strings.TrimPrefix(path, "../"), func(t *testing.T) {
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			config, err := configuration.Parse(f)
			if err != nil {
				t.Fatal(err)
			}
			var got []Options
			for _, kind := range []string{"registry", "repository"} {
				mws := config.Middleware[kind]
				if len(mws) != 1 || mws[0].Name != Name {
					t.Fatalf("middleware.%s = %+v", kind, mws)
				}
				o, err := ParseOptions(mws[0].Options)
				if err != nil {
					t.Fatal(err)
				}
				got = append(got, o)
			}
			if got[0] != got[1] {
				t.Errorf("registry and repository options differ: %+v %+v", got[0], got[1])
			}
			if o := got[0]; !o.AutoConvert || o.Database != "sqlite://"+DefaultDatabase || o.TagSuffix != DefaultTagSuffix {
				t.Errorf("options %+v", o)
			}
			if root := config.Storage.Parameters()["rootdirectory"]; root != "/var/lib/starlight/registry" {
				t.Errorf("storage root %v", root)
			}
		})
	}
}
