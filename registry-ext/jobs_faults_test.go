package registryext

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"math/rand"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/convert/tempdir"
)

// bigLayerImage is an image of one layer of n small files.
func bigLayerImage(t *testing.T, n int) *testImage {
	t.Helper()
	files := make([]tarFile, n)
	for i := range files {
		files[i] = tarFile{name: fmt.Sprintf("usr/share/doc/pkg%03d/file%06d", i/1000, i), body: fmt.Sprint(i)}
	}
	l, d := tarLayer(t, files)
	return buildImage(t, [][]byte{l}, []digest.Digest{d})
}

// TestPushesWhileIndexing pushes small images, one after the other, for
// as long as a big layer converts and is indexed: every push succeeds and
// gets its job, and every image converts. The push times are logged.
func TestPushesWhileIndexing(t *testing.T) {
	r := newTestRegistry(t, registryConfig{options: map[string]any{"workers": 2}})
	big := bigLayerImage(t, 40_000)
	bigDigest := r.push("big/app", "v1", big)

	var times []time.Duration
	var pushed []string
	for i := 0; ; i++ {
		j, err := r.ext().DB().Job(context.Background(), "big/app", bigDigest.String(), "v1")
		if err == nil && (j.State == api.StateReady || j.State == api.StateFailed) {
			break
		}
		ref := fmt.Sprintf("v%d", i)
		im := twoLayerImage(t, ref)
		for _, l := range im.layers {
			r.pushBlob("small/app", l)
		}
		r.pushBlob("small/app", im.config)
		// The manifest PUT queues the job; pushManifest fails the test
		// unless it is answered 201.
		start := time.Now()
		r.pushManifest("small/app", ref, ocispec.MediaTypeImageManifest, im.manifest)
		times = append(times, time.Since(start))
		pushed = append(pushed, ref)
	}
	if st := r.waitDone("big/app", "v1"); st.State != api.StateReady || st.Files < 40_000 {
		t.Fatalf("big image: %+v", st)
	}
	for _, ref := range pushed {
		if st := r.waitDone("small/app", ref); st.State != api.StateReady {
			t.Errorf("small/app:%s: %+v", ref, st)
		}
	}
	slices.Sort(times)
	if len(times) > 0 {
		t.Logf("%d manifest PUTs during the conversion and indexing of a 40,000-file layer: median %s, max %s",
			len(times), times[len(times)/2], times[len(times)-1])
	}
}

// TestFailedEnqueueFailsPush makes the index refuse new jobs: the push is
// answered 503 with the reason instead of succeeding without a
// conversion; once the index takes jobs again, pushing again converts.
func TestFailedEnqueueFailsPush(t *testing.T) {
	defer func(d time.Duration) { enqueueRetryFor = d }(enqueueRetryFor)
	enqueueRetryFor = 500 * time.Millisecond
	// A trigger is SQLite syntax.
	r := newTestRegistry(t, registryConfig{dsn: filepath.Join(t.TempDir(), "index.db")})
	r.execSQL(`CREATE TRIGGER refuse_jobs BEFORE INSERT ON jobs BEGIN SELECT RAISE(FAIL, 'injected fault'); END`)

	im := twoLayerImage(t, "refused")
	for _, l := range im.layers {
		r.pushBlob("lib/app", l)
	}
	r.pushBlob("lib/app", im.config)
	resp, body := r.do(http.MethodPut, "/v2/lib/app/manifests/v1", ocispec.MediaTypeImageManifest, im.manifest)
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "could not queue the conversion") ||
		!strings.Contains(string(body), "injected fault") {
		t.Fatalf("push with the queue refusing jobs: %s %s", resp.Status, body)
	}
	if _, code := r.manifest("lib/app", "v1"); code != http.StatusNotFound {
		t.Errorf("the failed push still wrote its tag: %d", code)
	}

	r.execSQL(`DROP TRIGGER refuse_jobs`)
	r.pushManifest("lib/app", "v1", ocispec.MediaTypeImageManifest, im.manifest)
	if st := r.waitDone("lib/app", "v1"); st.State != api.StateReady {
		t.Errorf("after the fault: %+v", st)
	}
}

// TestSweepQueuesLostJobs stores tags the way a registry that died before
// queuing their jobs leaves them (here: a registry with autoconvert off):
// the next registry's start-up sweep queues and converts the images, and
// leaves artifacts and converted tags alone.
func TestSweepQueuesLostJobs(t *testing.T) {
	root := filepath.Join(t.TempDir(), "storage")
	dsn := testDSN(t)
	r1 := newTestRegistry(t, registryConfig{root: root, dsn: dsn, options: map[string]any{"autoconvert": false}})
	r1.push("lost/app", "v1", twoLayerImage(t, "lost1"))
	r1.push("lost/other", "v2", twoLayerImage(t, "lost2"))
	// An artifact (not a container image) and a tag that looks converted.
	cfg := r1.pushBlob("lost/app", []byte(`{"kind":"sbom"}`))
	art, _ := json.Marshal(ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
		Config: ocispec.Descriptor{MediaType: "application/vnd.example.sbom", Digest: cfg.Digest, Size: cfg.Size},
		Layers: []ocispec.Descriptor{}})
	r1.pushManifest("lost/app", "sbom", ocispec.MediaTypeImageManifest, art)
	r1.push("lost/app", "v0-starlight", twoLayerImage(t, "fake"))
	r1.close()

	r2 := newTestRegistry(t, registryConfig{root: root, dsn: dsn})
	for _, ref := range []string{"lost/app:v1", "lost/other:v2"} {
		repo, tag, _ := strings.Cut(ref, ":")
		if st := r2.waitDone(repo, tag); st.State != api.StateReady {
			t.Errorf("%s after the sweep: %+v", ref, st)
		}
		if _, code := r2.manifest(repo, tag+"-starlight"); code != http.StatusOK {
			t.Errorf("%s-starlight: %d", ref, code)
		}
	}
	jobs, err := r2.ext().DB().Jobs(context.Background(), 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(jobs) != 2 {
		t.Errorf("jobs after the sweep: %+v, want v1 and v2 only", jobs)
	}
	// A second sweep finds nothing to do.
	if n, err := r2.ext().sweep(context.Background(), map[string]bool{}); err != nil || n != 0 {
		t.Errorf("second sweep queued %d (%v)", n, err)
	}
}

// gzipBomb is a gzip layer of one file of n zero bytes, about n/1000
// bytes long, and its diff_id.
func gzipBomb(t *testing.T, n int64) ([]byte, digest.Digest) {
	t.Helper()
	var hdr bytes.Buffer
	tw := tar.NewWriter(&hdr)
	tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "zeros", Mode: 0o644, Size: n, ModTime: time.Unix(1_600_000_000, 0)})
	tw.Flush()
	gz := func(b []byte) []byte {
		var out bytes.Buffer
		zw := gzip.NewWriter(&out)
		zw.Write(b)
		zw.Close()
		return out.Bytes()
	}
	h := digest.SHA256.Digester()
	h.Hash().Write(hdr.Bytes())
	out := bytes.NewBuffer(gz(hdr.Bytes()))
	mib := make([]byte, 1<<20)
	mibGz := gz(mib)
	for i := int64(0); i < n>>20; i++ {
		out.Write(mibGz)
		h.Hash().Write(mib)
	}
	out.Write(gz(make([]byte, 1024)))
	h.Hash().Write(make([]byte, 1024))
	return out.Bytes(), h.Digest()
}

// TestInvalidImagesFailAtOnce pushes images that can never convert: each
// fails at its first attempt (maxattempts is 3) with a reason naming the
// problem, and the pushed image stays pullable.
func TestInvalidImagesFailAtOnce(t *testing.T) {
	r := newTestRegistry(t, registryConfig{options: map[string]any{"maxuncompressed": 64 << 20, "maxfiles": 1000}})
	bomb, bombDiff := gzipBomb(t, 1<<30)
	parent, parentDiff := tarLayer(t, []tarFile{{name: "a", body: "file"}, {name: "a/b", body: "below a file"}})
	many := make([]tarFile, 1001)
	for i := range many {
		many[i] = tarFile{name: fmt.Sprintf("f%04d", i)}
	}
	manyLayer, manyDiff := tarLayer(t, many)
	good, goodDiff := tarLayer(t, []tarFile{{name: "ok", body: "fine"}})
	badConfig := buildImage(t, [][]byte{good}, []digest.Digest{goodDiff})
	badConfig.config = []byte(`{"rootfs": {"diff_ids": ["sha256:`) // malformed JSON
	var m ocispec.Manifest
	json.Unmarshal(badConfig.manifest, &m)
	m.Config.Digest, m.Config.Size = digest.FromBytes(badConfig.config), int64(len(badConfig.config))
	badConfig.manifest, _ = json.Marshal(m)

	for _, tc := range []struct {
		name string
		im   *testImage
		want string
	}{
		{"gzip bomb", buildImage(t, [][]byte{bomb}, []digest.Digest{bombDiff}), "uncompressed size exceeds 67108864 bytes"},
		{"file as parent", buildImage(t, [][]byte{parent}, []digest.Digest{parentDiff}), `its parent "a" is not a directory`},
		{"too many files", buildImage(t, [][]byte{manyLayer}, []digest.Digest{manyDiff}), "more than 1000 entries"},
		{"malformed config", badConfig, "malformed JSON"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tag := strings.ReplaceAll(tc.name, " ", "-")
			r.push("invalid/app", tag, tc.im)
			st := r.waitDone("invalid/app", tag)
			if st.State != api.StateFailed || st.Attempts != 1 || !strings.Contains(st.Error, tc.want) {
				t.Errorf("status %+v: want failed at the first attempt with %q", st, tc.want)
			}
			if _, code := r.manifest("invalid/app", tag); code != http.StatusOK {
				t.Errorf("pushed image: %d", code)
			}
		})
	}
}

// TestTempDirAcrossCrash: a registry's temporary files live in a directory
// of its process under tempdir; a crashed registry's directory (its lock
// released by the kernel) is removed when the next one starts, and a
// registry that stops removes its own.
func TestTempDirAcrossCrash(t *testing.T) {
	root := filepath.Join(t.TempDir(), "spool")
	// What a registry killed mid-conversion leaves: its directory, with
	// spool files of every kind in it.
	crashed := filepath.Join(root, tempdir.Prefix+"crashed")
	if err := os.MkdirAll(crashed, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"starlight-tar-1", "starlight-estargz-2", "starlight-blob-3", "esgzdata4"} {
		if err := os.WriteFile(filepath.Join(crashed, name), make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	r := newTestRegistry(t, registryConfig{options: map[string]any{"tempdir": root}})
	if _, err := os.Stat(crashed); !os.IsNotExist(err) {
		t.Errorf("the crashed registry's files survived start-up: %v", err)
	}
	own := r.ext().tmp.Path()
	if filepath.Dir(own) != root || os.Getenv("TMPDIR") != own {
		t.Errorf("temporary directory %s (TMPDIR %s), want one under %s", own, os.Getenv("TMPDIR"), root)
	}
	r.push("lib/app", "v1", twoLayerImage(t, "tmp"))
	if st := r.waitDone("lib/app", "v1"); st.State != api.StateReady {
		t.Fatalf("%+v", st)
	}
	if ents, _ := os.ReadDir(own); len(ents) != 0 {
		t.Errorf("files left in %s after the conversion: %v", own, ents)
	}
	r.close()
	if ents, _ := os.ReadDir(root); len(ents) != 0 {
		t.Errorf("left under %s after the registry stopped: %v", root, ents)
	}
}

// TestTempDirFull converts with the temporary directory on a full tmpfs:
// the job fails with an error saying the directory is full, is retried,
// and converts once space is back; the pushed image is untouched and the
// converted one complete.
func TestTempDirFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: mounting a tmpfs needs root")
	}
	root := t.TempDir()
	if err := unix.Mount("tmpfs", root, "tmpfs", 0, "size=40m,mode=0700"); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(root, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", root, err)
		}
	})
	filler := filepath.Join(root, "filler")
	if err := os.WriteFile(filler, make([]byte, 36<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	r := newTestRegistry(t, registryConfig{options: map[string]any{"tempdir": root, "maxattempts": 50, "retrydelay": "1s"}})
	random := make([]byte, 8<<20)
	rand.New(rand.NewSource(1)).Read(random)
	l, d := tarLayer(t, []tarFile{{name: "blob", body: string(random)}, {name: "etc/hostname", body: "full\n"}})
	im := buildImage(t, [][]byte{l}, []digest.Digest{d})
	r.push("full/app", "v1", im)

	deadline := time.Now().Add(2 * time.Minute)
	var st api.ImageStatus
	for {
		_, st, _ = r.status("full/app", "v1")
		if strings.Contains(st.Error, "is full") || st.State == api.StateReady || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if st.State == api.StateFailed || st.State == api.StateReady || !strings.Contains(st.Error, "temporary directory") ||
		!strings.Contains(st.Error, "no space left on device") {
		t.Fatalf("with the temporary directory full: %+v", st)
	}
	t.Logf("reason while full: %s", st.Error)
	if _, code := r.manifest("full/app", "v1"); code != http.StatusOK {
		t.Errorf("pushed image while the disk is full: %d", code)
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if st := r.waitDone("full/app", "v1"); st.State != api.StateReady {
		t.Fatalf("after space came back: %+v", st)
	}
	conv, code := r.manifest("full/app", "v1-starlight")
	if code != http.StatusOK || len(conv.Layers) != 1 {
		t.Fatalf("converted tag: %d %+v", code, conv)
	}
	resp, blob := r.do(http.MethodGet, "/v2/full/app/blobs/"+conv.Layers[0].Digest.String(), "", nil)
	if resp.StatusCode != http.StatusOK || digest.FromBytes(blob) != conv.Layers[0].Digest {
		t.Errorf("converted layer: %s, digest %s", resp.Status, digest.FromBytes(blob))
	}
	layer, err := r.ext().DB().GetLayer(context.Background(), conv.Layers[0].Digest.String())
	if err != nil || len(layer.Entries) != 2 { // blob, etc/hostname
		t.Errorf("index of the converted layer: %v, %v", layer, err)
	}
	if ents, _ := os.ReadDir(r.ext().tmp.Path()); len(ents) != 0 {
		t.Errorf("temporary files left: %v", ents)
	}
}

func TestParseLimitOptions(t *testing.T) {
	for _, tc := range []struct {
		in   map[string]any
		want Options
		ok   bool
	}{
		{nil, Options{MaxUncompressed: 16 << 30, MaxFiles: 300_000, SweepInterval: 10 * time.Minute}, true},
		{map[string]any{"maxuncompressed": 1 << 20, "maxfiles": "10", "sweepinterval": "0s"}, Options{MaxUncompressed: 1 << 20, MaxFiles: 10}, true},
		{map[string]any{"maxuncompressed": 0}, Options{}, false},
		{map[string]any{"maxfiles": -1}, Options{}, false},
		{map[string]any{"sweepinterval": "-1m"}, Options{}, false},
	} {
		o, err := ParseOptions(tc.in)
		if (err == nil) != tc.ok {
			t.Errorf("%v: error %v", tc.in, err)
			continue
		}
		if tc.ok && (o.MaxUncompressed != tc.want.MaxUncompressed || o.MaxFiles != tc.want.MaxFiles || o.SweepInterval != tc.want.SweepInterval) {
			t.Errorf("%v: %d bytes, %d files, sweep %s", tc.in, o.MaxUncompressed, o.MaxFiles, o.SweepInterval)
		}
	}
}
