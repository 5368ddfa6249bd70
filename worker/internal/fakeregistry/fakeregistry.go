// Package fakeregistry is a test double of a Starlight registry for the
// worker's tests: converted images described by their layer trees and raw
// gzip members, served as delta bundles, ranged blob GETs and trace
// uploads, with knobs to break, delay or corrupt the answers. The real
// registry is tested end to end in integration/.
package fakeregistry

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

// Image is a converted image as a registry would describe it: layer
// trees, and the raw gzip member of every chunk.
type Image struct {
	Manifest, Config []byte
	ManifestDigest   digest.Digest
	Layers           []api.LayerTree
	Members          map[string][]byte // content digest @ offset → gzip member
	ChunkData        map[string][]byte // same key → uncompressed chunk
	// Others are layers of other images the registry knows: a worker
	// that holds them is not sent the contents they list.
	Others []api.LayerTree
}

// File describes a file of a test layer.
type File struct {
	Name, Type, Link string
	Mode             uint32
	Data             []byte
}

// MemberKey keys Members and ChunkData: a content digest and a chunk offset.
func MemberKey(d string, off int64) string { return fmt.Sprintf("%s@%d", d, off) }

// BuildImage makes an image from layers of files. Regular files are cut in
// chunks of chunkSize, each its own gzip member, as in eStargz.
func BuildImage(t testing.TB, chunkSize int64, layers ...[]File) *Image {
	t.Helper()
	img := &Image{Members: map[string][]byte{}, ChunkData: map[string][]byte{}}
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
			e := api.Entry{Name: f.Name, Type: f.Type, Mode: f.Mode, ModTime: mtime, LinkName: f.Link}
			if f.Type == api.TypeReg && len(f.Data) > 0 {
				e.Size = int64(len(f.Data))
				e.Digest = digest.FromBytes(f.Data).String()
				for co := int64(0); co < e.Size; co += chunkSize {
					chunk := f.Data[co:min(co+chunkSize, e.Size)]
					var buf bytes.Buffer
					zw := gzip.NewWriter(&buf)
					zw.Write(chunk)
					zw.Close()
					e.Chunks = append(e.Chunks, api.Chunk{
						Offset: co, Size: int64(len(chunk)), Digest: digest.FromBytes(chunk).String(),
						CompressedOffset: off, CompressedSize: int64(buf.Len()),
					})
					off += int64(buf.Len())
					img.Members[MemberKey(e.Digest, co)] = buf.Bytes()
					img.ChunkData[MemberKey(e.Digest, co)] = chunk
				}
			}
			if err := e.Validate(); err != nil {
				t.Fatal(err)
			}
			tree.Entries = append(tree.Entries, e)
		}
		img.Layers = append(img.Layers, tree)
		diffIDs = append(diffIDs, diffID)
		descs = append(descs, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: blob, Size: tree.Size})
	}
	cfg := ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		Config:   ocispec.ImageConfig{Cmd: []string{"/bin/cat", "/etc/hello.txt"}},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: diffIDs},
	}
	img.Config, _ = json.Marshal(cfg)
	m := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(img.Config), Size: int64(len(img.Config))},
		Layers:    descs,
	}
	img.Manifest, _ = json.Marshal(m)
	img.ManifestDigest = digest.FromBytes(img.Manifest)
	return img
}

// Header plans the bundle for a worker that holds the layers in have:
// every content of the image it lacks, once, in layer order.
func (img *Image) Header(have []string) *api.BundleHeader {
	held := map[string]bool{}
	for _, l := range slices.Concat(img.Layers, img.Others) {
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
		ManifestDigest:    img.ManifestDigest.String(),
		ManifestMediaType: ocispec.MediaTypeImageManifest,
		Manifest:          img.Manifest,
		ConfigDigest:      digest.FromBytes(img.Config).String(),
		Config:            img.Config,
		Layers:            img.Layers,
	}
	sent := map[string]bool{}
	for _, l := range img.Layers {
		for _, e := range l.Entries {
			if e.Digest == "" || sent[e.Digest] {
				continue
			}
			sent[e.Digest] = true
			for _, c := range e.Chunks {
				size := int64(len(img.Members[MemberKey(e.Digest, c.Offset)]))
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

// Registry serves POST /starlight/delta for one image.
type Registry struct {
	Image    *Image
	User     string
	Password string

	t *testing.T

	mu       sync.Mutex
	requests []api.DeltaRequest
	// Gate, if set, is waited for after the header of the first request.
	Gate chan struct{}
	// HeaderGate, if set, is waited for before the header of the first
	// request: the registry is still planning.
	HeaderGate chan struct{}
	// BreakAfter, if > 0, ends the first response after that many frames
	// and half of the next one; with AlwaysBreak every response.
	BreakAfter  int
	AlwaysBreak bool
	// BreakInFrame, if > 0, ends every response in the middle of that
	// frame (an index in the header's frames), so that a resumed stream
	// breaks in its first frame: a bundle that never completes.
	BreakInFrame int

	// TraceFailure, if set, is answered (500) to trace reports.
	TraceFailure string
	// Refs are further references answered with the image (besides
	// app:v1), e.g. "app@<pushed manifest digest>".
	Refs []string
	// CorruptBlobs flips a byte of every blob served.
	CorruptBlobs bool

	// A hostile registry, for the worker's fault tests. With any of
	// these set, a bundle is built whole, then edited, then sent.
	//
	// EditHeader changes the planned header (a copy) before it is
	// written, in the version the worker asked for if the edited frames
	// are still chunks of the trees, else in version 1.
	EditHeader func(h *api.BundleHeader)
	// EditFrame returns the bytes sent for frame i of the header, in
	// place of raw, its member (nil for a frame the image has no member
	// for). The bytes may be of any length.
	EditFrame func(i int, f api.Frame, raw []byte) []byte
	// EditStream rewrites the whole answer: magic, header and frames.
	EditStream func(stream []byte) []byte

	// traces are the reports POSTed to /starlight/v1/traces.
	traces []api.TraceReport

	// blobRanges are the Range headers of the blob GETs served.
	blobRanges []string
}

// Blob returns the bytes of a layer blob of the image: its gzip members in
// compressed-offset order (the test blobs hold nothing else).
func (img *Image) Blob(d string) ([]byte, bool) {
	for _, l := range img.Layers {
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
			blob = append(blob, img.Members[MemberKey(digests[i], chunks[i].Offset)]...)
		}
		return blob, true
	}
	return nil, false
}

// serveBlob answers GET /v2/<repo>/blobs/<digest>, with Range support.
func (f *Registry) serveBlob(w http.ResponseWriter, r *http.Request) {
	d := r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]
	blob, ok := f.Image.Blob(d)
	if !ok || !strings.HasPrefix(r.URL.Path, "/v2/app/blobs/") {
		w.WriteHeader(http.StatusNotFound)
		json.NewEncoder(w).Encode(api.Error{Code: "BLOB_UNKNOWN", Message: "blob unknown to registry"})
		return
	}
	f.mu.Lock()
	f.blobRanges = append(f.blobRanges, r.Header.Get("Range"))
	if f.CorruptBlobs {
		blob = slices.Clone(blob)
		for i := range blob {
			blob[i] ^= 0x55
		}
	}
	f.mu.Unlock()
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(blob))
}

// BlobRanges are the Range headers of the blob GETs served so far.
func (f *Registry) BlobRanges() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.blobRanges)
}

func (f *Registry) serveTrace(w http.ResponseWriter, r *http.Request) {
	var rep api.TraceReport
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rep); err != nil {
		w.WriteHeader(http.StatusBadRequest)
		json.NewEncoder(w).Encode(api.Error{Code: api.CodeBadRequest, Message: err.Error()})
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.TraceFailure != "" {
		w.WriteHeader(http.StatusInternalServerError)
		json.NewEncoder(w).Encode(api.Error{Code: api.CodeInternal, Message: f.TraceFailure})
		return
	}
	f.traces = append(f.traces, rep)
	b, _ := json.Marshal(rep)
	w.WriteHeader(http.StatusCreated) // as the registry answers a new trace
	json.NewEncoder(w).Encode(api.TraceResult{ID: digest.FromBytes(b).String(), Accepted: len(rep.Accesses)})
}

// Traces are the reports uploaded so far.
func (f *Registry) Traces() []api.TraceReport {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]api.TraceReport(nil), f.traces...)
}

// ServeHTTP serves the delta, blob and trace routes.
func (f *Registry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	isBlob := r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/v2/")
	if !isBlob && (r.Method != http.MethodPost || r.URL.Path != "/starlight/delta" && r.URL.Path != "/starlight/v1/traces") {
		api.WriteError(w, http.StatusNotFound, api.CodeNotFound, "no such route")
		return
	}
	if u, p, ok := r.BasicAuth(); f.User != "" && (!ok || u != f.User || p != f.Password) {
		w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
		w.WriteHeader(http.StatusUnauthorized)
		json.NewEncoder(w).Encode(api.Error{Code: api.CodeUnauthorized, Message: "authentication required"})
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
	breakInFrame := f.BreakInFrame
	f.mu.Unlock()
	if req.Reference != "app:v1" && req.Reference != "broken:v1" && !slices.Contains(f.Refs, req.Reference) {
		w.WriteHeader(http.StatusNotFound)
		json.NewEncoder(w).Encode(api.Error{Code: api.CodeNotFound, Message: "image " + req.Reference + " not found"})
		return
	}
	if first && f.HeaderGate != nil {
		select {
		case <-f.HeaderGate:
		case <-r.Context().Done():
			return
		}
	}
	h := f.Image.Header(req.Have)
	h.Resume = req.Resume
	w.Header().Set("Content-Type", api.MediaTypeBundle)
	if f.EditHeader != nil || f.EditFrame != nil || f.EditStream != nil {
		f.serveHostile(w, h, req)
		return
	}
	bw, err := bundle.NewWriterVersion(w, h, bundle.NegotiateVersion(req.HeaderVersion))
	if err != nil {
		f.t.Error(err)
		return
	}
	w.(http.Flusher).Flush()
	if first && f.Gate != nil {
		select {
		case <-f.Gate:
		case <-r.Context().Done():
			return
		}
	}
	for i, fr := range bw.Remaining() {
		m := f.Image.Members[MemberKey(fr.Digest, fr.Offset)]
		if (first || f.AlwaysBreak) && f.BreakAfter > 0 && i == f.BreakAfter ||
			breakInFrame > 0 && h.Resume+i == breakInFrame {
			w.Write(m[:len(m)/2])
			return // the stream ends in the middle of a frame
		}
		if err := bw.WriteFrame(bytes.NewReader(m)); err != nil {
			return
		}
		w.(http.Flusher).Flush()
	}
}

// serveHostile answers a delta request with the bundle h, edited by
// EditHeader, EditFrame and EditStream.
func (f *Registry) serveHostile(w http.ResponseWriter, h *api.BundleHeader, req api.DeltaRequest) {
	if f.EditHeader != nil {
		// The planned header shares its trees with the image.
		b, err := json.Marshal(h)
		if err == nil {
			h = new(api.BundleHeader)
			err = json.Unmarshal(b, h)
		}
		if err != nil {
			f.t.Error(err)
			return
		}
		f.EditHeader(h)
	}
	var buf bytes.Buffer
	if _, err := bundle.NewWriterVersion(&buf, h, bundle.NegotiateVersion(req.HeaderVersion)); err != nil {
		f.t.Error(err)
		return
	}
	for i := h.Resume; i < len(h.Frames); i++ {
		fr := h.Frames[i]
		m := f.Image.Members[MemberKey(fr.Digest, fr.Offset)]
		if f.EditFrame != nil {
			m = f.EditFrame(i, fr, m)
		}
		buf.Write(m)
	}
	stream := buf.Bytes()
	if f.EditStream != nil {
		stream = f.EditStream(stream)
	}
	w.Write(stream)
}

// SetBreakInFrame sets BreakInFrame for the requests that come from now on
// (0: the registry stops breaking its streams).
func (f *Registry) SetBreakInFrame(i int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.BreakInFrame = i
}

// Requests are the delta requests received so far.
func (f *Registry) Requests() []api.DeltaRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]api.DeltaRequest(nil), f.requests...)
}

// Start serves f on an ephemeral loopback port until the test ends.
func Start(t *testing.T, f *Registry) (host string) {
	f.t = t
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// SetTraceFailure makes the registry answer trace reports with a 500 and
// msg from now on ("" accepts them again).
func (f *Registry) SetTraceFailure(msg string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.TraceFailure = msg
}

// CRIImage is a converted test image whose layers replace pushed (gzip)
// layers of a pushed manifest, as the registry's bundle header says.
func CRIImage(t testing.TB) (img *Image, pushedManifest digest.Digest, pushedLayers []digest.Digest) {
	img = BuildImage(t, 256<<10,
		[]File{
			{Name: "etc", Type: api.TypeDir, Mode: 0o755},
			{Name: "etc/hello.txt", Type: api.TypeReg, Mode: 0o644, Data: []byte("hello from the base\n")},
		},
		[]File{{Name: "app.txt", Type: api.TypeReg, Mode: 0o644, Data: []byte("the app\n")}},
	)
	for i := range img.Layers {
		o := digest.FromString(fmt.Sprintf("pushed gzip layer %d of %s", i, t.Name()))
		img.Layers[i].OriginalDigest = o.String()
		pushedLayers = append(pushedLayers, o)
	}
	return img, digest.FromString("pushed manifest of " + t.Name()), pushedLayers
}
