package daemon

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
)

// testImage is a converted image as a registry would describe it: layer
// trees, and the raw gzip member of every chunk.
type testImage struct {
	manifest, config []byte
	manifestDigest   digest.Digest
	layers           []api.LayerTree
	members          map[string][]byte // content digest @ offset → gzip member
	chunkData        map[string][]byte // same key → uncompressed chunk
	// others are layers of other images the registry knows: a worker
	// that holds them is not sent the contents they list.
	others []api.LayerTree
}

// testFile describes a file of a test layer.
type testFile struct {
	name, typ, link string
	mode            uint32
	data            []byte
}

func memberKey(d string, off int64) string { return fmt.Sprintf("%s@%d", d, off) }

// buildImage makes an image from layers of files. Regular files are cut in
// chunks of chunkSize, each its own gzip member, as in eStargz.
func buildImage(t testing.TB, chunkSize int64, layers ...[]testFile) *testImage {
	t.Helper()
	img := &testImage{members: map[string][]byte{}, chunkData: map[string][]byte{}}
	var diffIDs []digest.Digest
	var descs []ocispec.Descriptor
	mtime := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
	for i, files := range layers {
		// The blobs do not exist: only their digests matter to the
		// worker. Derive distinct ones from the layer index.
		salt := fmt.Sprintf("%d %s %v", i, t.Name(), files)
		blob := digest.FromString("test layer blob " + salt)
		diffID := digest.FromString("test layer diff " + salt)
		tree := api.LayerTree{Digest: blob.String(), DiffID: diffID.String(), Size: 1000}
		var off int64
		for _, f := range files {
			e := api.Entry{Name: f.name, Type: f.typ, Mode: f.mode, ModTime: mtime, LinkName: f.link}
			if f.typ == api.TypeReg && len(f.data) > 0 {
				e.Size = int64(len(f.data))
				e.Digest = digest.FromBytes(f.data).String()
				for co := int64(0); co < e.Size; co += chunkSize {
					chunk := f.data[co:min(co+chunkSize, e.Size)]
					var buf bytes.Buffer
					zw := gzip.NewWriter(&buf)
					zw.Write(chunk)
					zw.Close()
					e.Chunks = append(e.Chunks, api.Chunk{
						Offset: co, Size: int64(len(chunk)), Digest: digest.FromBytes(chunk).String(),
						CompressedOffset: off, CompressedSize: int64(buf.Len()),
					})
					off += int64(buf.Len())
					img.members[memberKey(e.Digest, co)] = buf.Bytes()
					img.chunkData[memberKey(e.Digest, co)] = chunk
				}
			}
			if err := e.Validate(); err != nil {
				t.Fatal(err)
			}
			tree.Entries = append(tree.Entries, e)
		}
		img.layers = append(img.layers, tree)
		diffIDs = append(diffIDs, diffID)
		descs = append(descs, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: blob, Size: tree.Size})
	}
	cfg := ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		Config:   ocispec.ImageConfig{Cmd: []string{"/bin/cat", "/etc/hello.txt"}},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
	}
	img.config, _ = json.Marshal(cfg)
	m := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(img.config), Size: int64(len(img.config))},
		Layers:    descs,
	}
	img.manifest, _ = json.Marshal(m)
	img.manifestDigest = digest.FromBytes(img.manifest)
	return img
}

// header plans the bundle for a worker that holds the layers in have:
// every content of the image it lacks, once, in layer order.
func (img *testImage) header(have []string) *api.BundleHeader {
	held := map[string]bool{}
	for _, l := range slices.Concat(img.layers, img.others) {
		for _, h := range have {
			if h == l.Digest {
				for _, e := range l.Entries {
					held[e.Digest] = true
				}
			}
		}
	}
	h := &api.BundleHeader{
		Repository:        "app",
		ManifestDigest:    img.manifestDigest.String(),
		ManifestMediaType: ocispec.MediaTypeImageManifest,
		Manifest:          img.manifest,
		ConfigDigest:      digest.FromBytes(img.config).String(),
		Config:            img.config,
		Layers:            img.layers,
	}
	sent := map[string]bool{}
	for _, l := range img.layers {
		for _, e := range l.Entries {
			if e.Digest == "" || sent[e.Digest] {
				continue
			}
			sent[e.Digest] = true
			for _, c := range e.Chunks {
				size := int64(len(img.members[memberKey(e.Digest, c.Offset)]))
				h.Stats.ImageBytes += size
				if held[e.Digest] {
					h.Stats.DedupBytes += size
					continue
				}
				h.Frames = append(h.Frames, api.Frame{Digest: e.Digest, Offset: c.Offset, Size: c.Size, ChunkDigest: c.Digest, CompressedSize: size})
				h.Stats.SendBytes += size
			}
		}
	}
	return h
}

// fakeRegistry serves POST /starlight/delta for one image.
type fakeRegistry struct {
	t        *testing.T
	img      *testImage
	user     string
	password string

	mu       sync.Mutex
	requests []api.DeltaRequest
	// gate, if set, is waited for after the header of the first request.
	gate chan struct{}
	// headerGate, if set, is waited for before the header of the first
	// request: the registry is still planning.
	headerGate chan struct{}
	// breakAfter, if > 0, ends the first response after that many frames
	// and half of the next one; with alwaysBreak every response.
	breakAfter  int
	alwaysBreak bool

	// traces are the reports POSTed to /starlight/v1/traces;
	// traceFailure, if set, is answered (500) instead.
	traces       []api.TraceReport
	traceFailure string
	// refs are further references answered with the image (besides
	// app:v1), e.g. "app@<pushed manifest digest>".
	refs []string

	// blobRanges are the Range headers of the blob GETs served;
	// corruptBlobs flips a byte of every blob served.
	blobRanges   []string
	corruptBlobs bool
}

// blob returns the bytes of a layer blob of the image: its gzip members in
// compressed-offset order (the test blobs hold nothing else).
func (img *testImage) blob(d string) ([]byte, bool) {
	for _, l := range img.layers {
		if l.Digest != d {
			continue
		}
		var chunks []api.Chunk
		var digests []string
		for _, e := range l.Entries {
			for _, c := range e.Chunks {
				chunks = append(chunks, c)
				digests = append(digests, e.Digest)
			}
		}
		idx := make([]int, len(chunks))
		for i := range idx {
			idx[i] = i
		}
		slices.SortFunc(idx, func(a, b int) int { return int(chunks[a].CompressedOffset - chunks[b].CompressedOffset) })
		var blob []byte
		for _, i := range idx {
			if chunks[i].CompressedOffset != int64(len(blob)) {
				continue // a content repeated in the layer: stored once
			}
			blob = append(blob, img.members[memberKey(digests[i], chunks[i].Offset)]...)
		}
		return blob, true
	}
	return nil, false
}

// serveBlob answers GET /v2/<repo>/blobs/<digest>, with Range support.
func (f *fakeRegistry) serveBlob(w http.ResponseWriter, r *http.Request) {
	d := r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]
	blob, ok := f.img.blob(d)
	if !ok || !strings.HasPrefix(r.URL.Path, "/v2/app/blobs/") {
		w.WriteHeader(http.StatusNotFound)
		json.NewEncoder(w).Encode(api.Error{Code: "BLOB_UNKNOWN", Message: "blob unknown to registry"})
		return
	}
	f.mu.Lock()
	f.blobRanges = append(f.blobRanges, r.Header.Get("Range"))
	if f.corruptBlobs {
		blob = slices.Clone(blob)
		for i := range blob {
			blob[i] ^= 0x55
		}
	}
	f.mu.Unlock()
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(blob))
}

func (f *fakeRegistry) BlobRanges() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.blobRanges)
}

func (f *fakeRegistry) serveTrace(w http.ResponseWriter, r *http.Request) {
	var rep api.TraceReport
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rep); err != nil {
		w.WriteHeader(http.StatusBadRequest)
		json.NewEncoder(w).Encode(api.Error{Code: "BAD_REQUEST", Message: err.Error()})
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.traceFailure != "" {
		w.WriteHeader(http.StatusInternalServerError)
		json.NewEncoder(w).Encode(api.Error{Code: "INTERNAL", Message: f.traceFailure})
		return
	}
	f.traces = append(f.traces, rep)
	b, _ := json.Marshal(rep)
	w.WriteHeader(http.StatusCreated) // as the registry answers a new trace
	json.NewEncoder(w).Encode(api.TraceResult{ID: digest.FromBytes(b).String(), Accepted: len(rep.Accesses)})
}

func (f *fakeRegistry) Traces() []api.TraceReport {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]api.TraceReport(nil), f.traces...)
}

func (f *fakeRegistry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	isBlob := r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/v2/")
	if !isBlob && (r.Method != http.MethodPost || r.URL.Path != "/starlight/delta" && r.URL.Path != "/starlight/v1/traces") {
		http.Error(w, `{"code":"NOT_FOUND","message":"no such route"}`, http.StatusNotFound)
		return
	}
	if u, p, ok := r.BasicAuth(); f.user != "" && (!ok || u != f.user || p != f.password) {
		w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
		w.WriteHeader(http.StatusUnauthorized)
		json.NewEncoder(w).Encode(api.Error{Code: "UNAUTHORIZED", Message: "authentication required"})
		return
	}
	if isBlob {
		f.serveBlob(w, r)
		return
	}
	if r.URL.Path == "/starlight/v1/traces" {
		f.serveTrace(w, r)
		return
	}
	var req api.DeltaRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	f.mu.Lock()
	f.requests = append(f.requests, req)
	first := len(f.requests) == 1
	f.mu.Unlock()
	if req.Reference != "app:v1" && req.Reference != "broken:v1" && !slices.Contains(f.refs, req.Reference) {
		w.WriteHeader(http.StatusNotFound)
		json.NewEncoder(w).Encode(api.Error{Code: "NOT_FOUND", Message: "image " + req.Reference + " not found"})
		return
	}
	if first && f.headerGate != nil {
		select {
		case <-f.headerGate:
		case <-r.Context().Done():
			return
		}
	}
	h := f.img.header(req.Have)
	h.Resume = req.Resume
	w.Header().Set("Content-Type", api.MediaTypeBundle)
	bw, err := bundle.NewWriter(w, h)
	if err != nil {
		f.t.Error(err)
		return
	}
	w.(http.Flusher).Flush()
	if first && f.gate != nil {
		select {
		case <-f.gate:
		case <-r.Context().Done():
			return
		}
	}
	for i, fr := range bw.Remaining() {
		m := f.img.members[memberKey(fr.Digest, fr.Offset)]
		if (first || f.alwaysBreak) && f.breakAfter > 0 && i == f.breakAfter {
			w.Write(m[:len(m)/2])
			return // the stream ends in the middle of a frame
		}
		if err := bw.WriteFrame(bytes.NewReader(m)); err != nil {
			return
		}
		w.(http.Flusher).Flush()
	}
}

func (f *fakeRegistry) Requests() []api.DeltaRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]api.DeltaRequest(nil), f.requests...)
}

func startFakeRegistry(t *testing.T, f *fakeRegistry) (host string) {
	f.t = t
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}
