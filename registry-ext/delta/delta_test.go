package delta

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
)

// scene is two images in two repositories that share contents:
//
//	app        = base + top; top repeats a file of base, changes one and
//	             adds new ones; base holds the same content twice
//	other/repo = other; repeats two contents of base
type scene struct {
	f                *fixture
	base, top, other *tlayer
	app, otherImg    digest.Digest
}

func newScene(t *testing.T) *scene {
	f := newFixture(t)
	shared := data(1, 1000)
	big := data(2, 3*testChunkSize+100) // four chunks
	dup := data(3, 500)
	s := &scene{f: f}
	s.base = f.layer(
		dir("bin/"), dir("etc/"),
		reg("etc/a", shared),
		reg("bin/big", big),
		tfile{name: "bin/sh", typ: tar.TypeSymlink, link: "big"},
		tfile{name: "bin/big2", typ: tar.TypeLink, link: "bin/big"},
		reg("etc/empty", nil),
		reg("etc/dup1", dup),
		reg("etc/dup2", dup),
		tfile{name: "bin/ping", content: data(7, 300), mode: 0o4755,
			xattrs: map[string]string{"security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00"}},
	)
	s.top = f.layer(
		dir("etc/"), dir("usr/"),
		reg("etc/a", shared),
		reg("usr/new", data(4, 2*testChunkSize+7)),
		reg("etc/.wh.dup2", nil),
		reg("etc/dup1", data(5, 800)),
		reg("usr/dup3", dup),
	)
	s.app = f.image("app", s.base, s.top)
	for _, e := range s.base.entries {
		if e.Name == "bin/big" && len(e.Chunks) != 4 {
			t.Fatalf("bin/big has %d chunks, want 4", len(e.Chunks))
		}
	}
	s.other = f.layer(reg("opt/big", big), reg("opt/own", data(6, 5000)), reg("opt/a", shared))
	s.otherImg = f.image("other/repo", s.other)
	return s
}

// contents returns the content digests of layers.
func contents(layers ...*tlayer) map[string]bool {
	set := map[string]bool{}
	for _, l := range layers {
		for _, e := range l.entries {
			if e.Type == api.TypeReg && e.Size > 0 {
				set[e.Digest] = true
			}
		}
	}
	return set
}

// server serves ServeDelta as the registry would, the repository and
// manifest taken from the query. done receives when a handler returns.
func (s *scene) server(t *testing.T, p *Planner) (*httptest.Server, chan struct{}) {
	done := make(chan struct{}, 16)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() { done <- struct{}{} }()
		// The registry's route decodes and checks the body itself; this
		// is the least a route does.
		var req api.DeltaRequest
		if err := json.NewDecoder(io.LimitReader(r.Body, 4<<20)).Decode(&req); err != nil {
			writeError(r.Context(), w, fmt.Errorf("%w: %w", ErrBadRequest, err))
			return
		}
		q := r.URL.Query()
		p.ServeDelta(w, r, req, digest.Digest(q.Get("manifest")), q.Get("repo"))
	}))
	t.Cleanup(srv.Close)
	return srv, done
}

func post(ctx context.Context, t *testing.T, srv *httptest.Server, repo string, manifest digest.Digest, req api.DeltaRequest) *http.Response {
	t.Helper()
	body, _ := json.Marshal(req)
	u := srv.URL + "/starlight/delta?" + url.Values{"repo": {repo}, "manifest": {manifest.String()}}.Encode()
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := srv.Client().Do(hr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// received is one frame as a worker receives it.
type received struct {
	frame api.Frame
	raw   []byte // as on the wire
	data  []byte // decoded and verified
}

// fetch posts req and decodes the whole bundle.
func fetch(t *testing.T, srv *httptest.Server, repo string, manifest digest.Digest, req api.DeltaRequest) (*http.Response, *api.BundleHeader, []received) {
	t.Helper()
	resp := post(context.Background(), t, srv, repo, manifest, req)
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("status %d: %s", resp.StatusCode, b)
	}
	if ct := resp.Header.Get("Content-Type"); ct != api.MediaTypeBundle {
		t.Errorf("Content-Type %q", ct)
	}
	h, frames, err := readBundle(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, h, frames
}

func readBundle(r io.Reader) (*api.BundleHeader, []received, error) {
	br, err := bundle.NewReader(r)
	if err != nil {
		return nil, nil, err
	}
	var frames []received
	for {
		f, rd, err := br.Next()
		if err == io.EOF {
			return br.Header(), frames, nil
		}
		if err != nil {
			return br.Header(), frames, err
		}
		raw, err := io.ReadAll(rd)
		if err != nil {
			return br.Header(), frames, err
		}
		dec, err := bundle.Decode(f, bytes.NewReader(raw))
		if err != nil {
			return br.Header(), frames, err
		}
		data, err := io.ReadAll(dec)
		if err != nil {
			return br.Header(), frames, err
		}
		frames = append(frames, received{frame: f, raw: raw, data: data})
	}
}

// reassemble puts the frames' chunks together into whole contents and
// checks each against its digest.
func reassemble(t *testing.T, h *api.BundleHeader, frames []received) map[string][]byte {
	t.Helper()
	sizes := map[string]int64{}
	for _, l := range h.Layers {
		for _, e := range l.Entries {
			if e.Digest != "" {
				sizes[e.Digest] = e.Size
			}
		}
	}
	got := map[string][]byte{}
	filled := map[string]int64{}
	for _, fr := range frames {
		f := fr.frame
		if _, ok := got[f.Digest]; !ok {
			size, ok := sizes[f.Digest]
			if !ok {
				t.Fatalf("frame of %s, which no entry of the header holds", f.Digest)
			}
			got[f.Digest] = make([]byte, size)
		}
		copy(got[f.Digest][f.Offset:], fr.data)
		filled[f.Digest] += int64(len(fr.data))
	}
	for d, b := range got {
		if filled[d] != int64(len(b)) {
			t.Errorf("%s: frames cover %d of %d bytes", d, filled[d], len(b))
		}
		sum := sha256.Sum256(b)
		if "sha256:"+hex.EncodeToString(sum[:]) != d {
			t.Errorf("%s: reassembled content has another digest", d)
		}
	}
	return got
}

func frameKeys(frames []api.Frame) []string {
	keys := make([]string, len(frames))
	for i, f := range frames {
		keys[i] = fmt.Sprintf("%s@%d", f.Digest, f.Offset)
	}
	return keys
}

// wantOrder is the default order: layer order, then TOC order, then chunk
// order, each content at its first occurrence.
func wantOrder(held map[string]bool, layers ...*tlayer) []string {
	seen := map[string]bool{}
	var keys []string
	for _, l := range layers {
		for _, e := range l.entries {
			if e.Type != api.TypeReg || e.Size == 0 || seen[e.Digest] {
				continue
			}
			seen[e.Digest] = true
			if held[e.Digest] {
				continue
			}
			for _, c := range e.Chunks {
				keys = append(keys, fmt.Sprintf("%s@%d", e.Digest, c.Offset))
			}
		}
	}
	return keys
}

func TestDeltaDeliversEveryContent(t *testing.T) {
	s := newScene(t)
	srv, _ := s.server(t, s.f.planner())
	resp, h, frames := fetch(t, srv, "app", s.app, api.DeltaRequest{Reference: "app:v1"})

	// The header describes the image: manifest, config, every layer.
	manifest, _ := os.ReadFile(filepath.Join(s.f.blobs.dir, s.app.Encoded()))
	if h.ManifestDigest != s.app.String() || !bytes.Equal(h.Manifest, manifest) {
		t.Errorf("manifest %s does not match the stored one", h.ManifestDigest)
	}
	if h.ManifestMediaType != "application/vnd.oci.image.manifest.v1+json" {
		t.Errorf("manifest media type %q", h.ManifestMediaType)
	}
	if digest.FromBytes(h.Config).String() != h.ConfigDigest {
		t.Errorf("config bytes do not match config digest %s", h.ConfigDigest)
	}
	if h.Repository != "app" {
		t.Errorf("repository %q", h.Repository)
	}
	files := 0
	for i, l := range []*tlayer{s.base, s.top} {
		got := h.Layers[i]
		if got.Digest != l.digest.String() || got.DiffID != l.diffID.String() || got.Size != l.size {
			t.Errorf("layer %d: got %s/%s/%d, want %s/%s/%d", i, got.Digest, got.DiffID, got.Size, l.digest, l.diffID, l.size)
		}
		gotJSON, _ := json.Marshal(got.Entries)
		wantJSON, _ := json.Marshal(l.entries)
		if !bytes.Equal(gotJSON, wantJSON) {
			t.Errorf("layer %d tree:\n got %s\nwant %s", i, gotJSON, wantJSON)
		}
		files += len(l.entries)
	}
	if len(h.Layers) != 2 {
		t.Fatalf("%d layers, want 2", len(h.Layers))
	}

	// Every content arrives, once, and reassembles to its digest.
	got := reassemble(t, h, frames)
	want := contents(s.base, s.top)
	if len(got) != len(want) {
		t.Errorf("%d contents, want %d", len(got), len(want))
	}
	for d := range want {
		if _, ok := got[d]; !ok {
			t.Errorf("content %s missing", d)
		}
	}
	keys := frameKeys(h.Frames)
	if len(slices.Compact(slices.Sorted(slices.Values(keys)))) != len(keys) {
		t.Errorf("a chunk travels twice: %v", keys)
	}
	if len(frames) != len(h.Frames) {
		t.Errorf("received %d frames, header announces %d", len(frames), len(h.Frames))
	}

	// The statistics add up, in the header and the response headers.
	var send int64
	for _, f := range h.Frames {
		send += f.CompressedSize
	}
	st := h.Stats
	if st.SendBytes != send || st.DedupBytes != 0 || st.ImageBytes != send || st.Contents != len(want) || st.Files != files {
		t.Errorf("stats %+v; want send=image=%d dedup=0 contents=%d files=%d", st, send, len(want), files)
	}
	for k, v := range map[string]int64{api.HeaderImageBytes: st.ImageBytes, api.HeaderDedupBytes: st.DedupBytes, api.HeaderSendBytes: st.SendBytes} {
		if resp.Header.Get(k) != strconv.FormatInt(v, 10) {
			t.Errorf("%s: %q, want %d", k, resp.Header.Get(k), v)
		}
	}

	// Each layer blob is opened once for the whole stream.
	for _, l := range []*tlayer{s.base, s.top} {
		if n := s.f.blobs.count(l.digest); n != 1 {
			t.Errorf("layer %s opened %d times", l.digest, n)
		}
	}
	if n := waitClosed(s.f.blobs); n != 0 {
		t.Errorf("%d blobs left open", n)
	}
}

func TestDeltaOrder(t *testing.T) {
	s := newScene(t)
	srv, _ := s.server(t, s.f.planner())
	_, h, _ := fetch(t, srv, "app", s.app, api.DeltaRequest{Reference: "app:v1"})
	if got, want := frameKeys(h.Frames), wantOrder(nil, s.base, s.top); !slices.Equal(got, want) {
		t.Errorf("frame order:\n got %v\nwant %v", got, want)
	}
	// A content present in both layers comes from the first one.
	_, srcs, err := s.f.planner().Plan(context.Background(), "app", s.app, api.DeltaRequest{})
	if err != nil {
		t.Fatal(err)
	}
	inBase := contents(s.base)
	for i, f := range h.Frames {
		if inBase[f.Digest] && srcs[i].Layer != s.base.digest {
			t.Errorf("frame %d (%s) taken from %s, not from the base layer", i, f.Digest, srcs[i].Layer)
		}
	}
	// Identical requests, identical bundles.
	_, h2, _ := fetch(t, srv, "app", s.app, api.DeltaRequest{Reference: "app:v1"})
	if !slices.Equal(h.Frames, h2.Frames) {
		t.Error("two identical requests yield different frames")
	}
}

func TestDeltaDedup(t *testing.T) {
	s := newScene(t)
	srv, _ := s.server(t, s.f.planner())
	unknown := digest.FromString("a layer this registry never indexed").String()
	tests := []struct {
		name  string
		repo  string
		image digest.Digest
		have  []string
		held  map[string]bool // contents the worker must not receive
		order []*tlayer
	}{
		{"base layer held", "app", s.app, []string{s.base.digest.String()}, contents(s.base), []*tlayer{s.base, s.top}},
		{"layer of another image and repository", "app", s.app, []string{s.other.digest.String()}, contents(s.other), []*tlayer{s.base, s.top}},
		{"whole image held", "app", s.app, []string{s.top.digest.String(), s.base.digest.String(), s.base.digest.String()}, contents(s.base, s.top), []*tlayer{s.base, s.top}},
		{"unknown layer", "app", s.app, []string{unknown}, nil, []*tlayer{s.base, s.top}},
		{"other image, app held", "other/repo", s.otherImg, []string{s.base.digest.String(), s.top.digest.String()}, contents(s.base, s.top), []*tlayer{s.other}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, h, frames := fetch(t, srv, tt.repo, tt.image, api.DeltaRequest{Reference: tt.repo + ":v1", Have: tt.have})
			got := reassemble(t, h, frames)
			for d := range got {
				if tt.held[d] {
					t.Errorf("received %s, which the worker holds", d)
				}
			}
			want := contents(tt.order...)
			for d := range want {
				if _, ok := got[d]; !ok && !tt.held[d] {
					t.Errorf("content %s missing", d)
				}
			}
			if gotKeys, wantKeys := frameKeys(h.Frames), wantOrder(tt.held, tt.order...); !slices.Equal(gotKeys, wantKeys) {
				t.Errorf("frames:\n got %v\nwant %v", gotKeys, wantKeys)
			}
			st := h.Stats
			if st.ImageBytes != st.DedupBytes+st.SendBytes {
				t.Errorf("stats %+v do not add up", st)
			}
			if (st.DedupBytes > 0) != (len(tt.held) > 0) {
				t.Errorf("dedup bytes %d with %d held contents", st.DedupBytes, len(tt.held))
			}
			if resp.Header.Get(api.HeaderDedupBytes) != strconv.FormatInt(st.DedupBytes, 10) {
				t.Errorf("%s: %q", api.HeaderDedupBytes, resp.Header.Get(api.HeaderDedupBytes))
			}
			if len(h.Layers) != len(tt.order) {
				t.Errorf("header has %d layers, want every layer of the image", len(h.Layers))
			}
		})
	}
}

func TestDeltaResume(t *testing.T) {
	s := newScene(t)
	srv, _ := s.server(t, s.f.planner())
	req := api.DeltaRequest{Reference: "app:v1", Have: []string{s.other.digest.String()}}
	_, full, fullFrames := fetch(t, srv, "app", s.app, req)
	if len(fullFrames) < 4 {
		t.Fatalf("fixture too small: %d frames", len(fullFrames))
	}
	for _, n := range []int{0, 1, len(fullFrames) / 2, len(fullFrames) - 1, len(fullFrames)} {
		t.Run(strconv.Itoa(n), func(t *testing.T) {
			req := req
			req.Resume = n
			_, h, frames := fetch(t, srv, "app", s.app, req)
			if h.Resume != n {
				t.Errorf("header resume %d, want %d", h.Resume, n)
			}
			if !slices.Equal(h.Frames, full.Frames) || h.Stats != full.Stats {
				t.Error("a resumed header differs from the full one")
			}
			if len(frames) != len(fullFrames)-n {
				t.Fatalf("%d frames, want %d", len(frames), len(fullFrames)-n)
			}
			joined := slices.Concat(fullFrames[:n], frames)
			for i := range joined {
				if !bytes.Equal(joined[i].raw, fullFrames[i].raw) || joined[i].frame != fullFrames[i].frame {
					t.Fatalf("frame %d differs from the full stream's", i)
				}
			}
		})
	}
}

func TestDeltaBadRequests(t *testing.T) {
	s := newScene(t)
	srv, _ := s.server(t, s.f.planner())
	tooMany := make([]string, MaxHave+1)
	for i := range tooMany {
		tooMany[i] = digest.FromString(strconv.Itoa(i)).String()
	}
	tests := []struct {
		name     string
		manifest digest.Digest
		req      api.DeltaRequest
		status   int
		code     api.ErrorCode
	}{
		{"malformed have digest", s.app, api.DeltaRequest{Have: []string{"sha256:xyz"}}, 400, api.CodeBadRequest},
		{"non-sha256 have digest", s.app, api.DeltaRequest{Have: []string{digest.SHA512.FromString("x").String()}}, 400, api.CodeBadRequest},
		{"path in have digest", s.app, api.DeltaRequest{Have: []string{"sha256:../../etc/passwd"}}, 400, api.CodeBadRequest},
		{"too many have", s.app, api.DeltaRequest{Have: tooMany}, 400, api.CodeBadRequest},
		{"negative resume", s.app, api.DeltaRequest{Resume: -1}, 400, api.CodeBadRequest},
		{"resume past the end", s.app, api.DeltaRequest{Resume: 1000}, 400, api.CodeBadRequest},
		{"unknown manifest", digest.FromString("nope"), api.DeltaRequest{}, 404, api.CodeNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := post(context.Background(), t, srv, "app", tt.manifest, tt.req)
			checkError(t, resp, tt.status, tt.code)
			// Plan checks the request too, for callers that skip DecodeRequest.
			_, _, err := s.f.planner().Plan(context.Background(), "app", tt.manifest, tt.req)
			if want := map[int]error{400: ErrBadRequest, 404: ErrNotFound}[tt.status]; !errors.Is(err, want) {
				t.Errorf("Plan: %v, want an error wrapping %v", err, want)
			}
		})
	}
}

func checkError(t *testing.T, resp *http.Response, status int, code api.ErrorCode) {
	t.Helper()
	if resp.StatusCode != status {
		t.Fatalf("status %d, want %d", resp.StatusCode, status)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q", ct)
	}
	var e api.Error
	if err := json.NewDecoder(resp.Body).Decode(&e); err != nil {
		t.Fatal(err)
	}
	if e.Code != code || e.Message == "" {
		t.Errorf("error %+v, want code %s and a message", e, code)
	}
}

func TestDeltaStorageFailures(t *testing.T) {
	t.Run("first blob missing", func(t *testing.T) {
		s := newScene(t)
		srv, _ := s.server(t, s.f.planner())
		if err := os.Remove(filepath.Join(s.f.blobs.dir, s.base.digest.Encoded())); err != nil {
			t.Fatal(err)
		}
		resp := post(context.Background(), t, srv, "app", s.app, api.DeltaRequest{})
		if resp.StatusCode != http.StatusInternalServerError {
			t.Fatalf("status %d, want 500", resp.StatusCode)
		}
		var e api.Error
		if err := json.NewDecoder(resp.Body).Decode(&e); err != nil || e.Code != api.CodeInternal {
			t.Errorf("body %+v, %v", e, err)
		}
	})
	t.Run("blob missing mid-stream", func(t *testing.T) {
		s := newScene(t)
		srv, _ := s.server(t, s.f.planner())
		if err := os.Remove(filepath.Join(s.f.blobs.dir, s.top.digest.Encoded())); err != nil {
			t.Fatal(err)
		}
		resp := post(context.Background(), t, srv, "app", s.app, api.DeltaRequest{})
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d, want 200", resp.StatusCode)
		}
		h, frames, err := readBundle(resp.Body)
		if err == nil {
			t.Fatal("a bundle whose source failed decoded without error")
		}
		if h == nil || len(frames) == 0 || len(frames) >= len(h.Frames) {
			t.Errorf("want the header and the frames of the base layer, got %d frames", len(frames))
		}
		for _, fr := range frames {
			if !contents(s.base)[fr.frame.Digest] {
				t.Errorf("frame %s does not come from the base layer", fr.frame.Digest)
			}
		}
	})
}

func TestDeltaPriority(t *testing.T) {
	s := newScene(t)
	p := s.f.planner().WithPriority(PriorityFunc(func(_ context.Context, repo string, m digest.Digest, layers []api.LayerTree, cands []Candidate) error {
		if repo != "app" || m != s.app || len(layers) != 2 {
			return errors.New("unexpected arguments")
		}
		for i := range cands {
			if cands[i].Name == "usr/new" {
				cands[i].Rank = -1
			}
		}
		return nil
	}))
	srv, _ := s.server(t, p)
	_, h, frames := fetch(t, srv, "app", s.app, api.DeltaRequest{})
	reassemble(t, h, frames)
	var newDigest string
	for _, e := range s.top.entries {
		if e.Name == "usr/new" {
			newDigest = e.Digest
		}
	}
	var want []string
	for _, k := range wantOrder(nil, s.base, s.top) {
		if k[:len(newDigest)] == newDigest {
			want = append(want, k)
		}
	}
	for _, k := range wantOrder(nil, s.base, s.top) {
		if k[:len(newDigest)] != newDigest {
			want = append(want, k)
		}
	}
	if got := frameKeys(h.Frames); !slices.Equal(got, want) {
		t.Errorf("frames:\n got %v\nwant %v", got, want)
	}
}

func TestDeltaCancel(t *testing.T) {
	s := newScene(t)
	s.f.blobs.gate = make(chan struct{})
	s.f.blobs.gated = map[digest.Digest]bool{s.base.digest: true, s.top.digest: true}
	t.Cleanup(func() { close(s.f.blobs.gate) })
	srv, done := s.server(t, s.f.planner())

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	resp := post(ctx, t, srv, "app", s.app, api.DeltaRequest{})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	// The header arrives while the frames are held back.
	br, err := bundle.NewReader(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if len(br.Header().Frames) == 0 {
		t.Fatal("no frames planned")
	}
	cancel()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the stream did not stop after the request was cancelled")
	}
	if n := waitClosed(s.f.blobs); n != 0 {
		t.Errorf("%d blobs left open", n)
	}
}

// waitClosed returns the blobs still open once the server had a moment to
// finish: the client reads the last frame before the handler's deferred
// close of its blobs runs.
func waitClosed(b interface{ stillOpen() int }) int {
	deadline := time.Now().Add(5 * time.Second)
	for b.stillOpen() != 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	return b.stillOpen()
}
