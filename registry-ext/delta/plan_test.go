package delta

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"slices"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/schema"
)

// memIndex is an in-memory Index and TraceIndex: layers by digest, the
// layer digests of every converted manifest, and merged priorities. It
// lets the planner's logic be tested without a database; the fixture's
// tests cover the same logic over schema and SQLite.
type memIndex struct {
	layers     map[string]api.LayerTree
	manifests  map[string][]string              // converted manifest → layer digests, base first
	originals  map[string][]string              // repository@manifest → pushed manifests
	priorities map[string][]schema.PriorityItem // repository@manifest → merged priority
	predicted  map[string][]schema.PriorityItem // repository@manifest → predicted priority
	previous   map[string]string                // repository@manifest → previous traced manifest
	fail       error                            // returned by every method when set
}

func newMemIndex() *memIndex {
	return &memIndex{layers: map[string]api.LayerTree{}, manifests: map[string][]string{},
		originals: map[string][]string{}, priorities: map[string][]schema.PriorityItem{},
		predicted: map[string][]schema.PriorityItem{}, previous: map[string]string{}}
}

var (
	_ Index      = (*memIndex)(nil)
	_ TraceIndex = (*memIndex)(nil)
)

func (m *memIndex) ManifestTrees(_ context.Context, manifest string) ([]api.LayerTree, error) {
	if m.fail != nil {
		return nil, m.fail
	}
	digests, ok := m.manifests[manifest]
	if !ok {
		return nil, schema.ErrNotFound
	}
	if len(digests) == 0 {
		return nil, nil // as schema answers for a manifest without layers
	}
	trees := make([]api.LayerTree, len(digests))
	for i, d := range digests {
		l, ok := m.layers[d]
		if !ok {
			return nil, fmt.Errorf("index of manifest %s: layer %s is not indexed", manifest, d)
		}
		trees[i] = l // a copy: the planner sets OriginalDigest
	}
	return trees, nil
}

func (m *memIndex) OriginalManifests(_ context.Context, repository, manifest string) ([]string, error) {
	return m.originals[repository+"@"+manifest], m.fail
}

func (m *memIndex) ContentsInLayers(_ context.Context, layers []string, contents map[string]struct{}) (map[string]struct{}, error) {
	found := map[string]struct{}{}
	for _, d := range layers {
		for _, e := range m.layers[d].Entries {
			if _, ok := contents[e.Digest]; ok {
				found[e.Digest] = struct{}{}
			}
		}
	}
	return found, m.fail
}

func (m *memIndex) TraceTotals(context.Context) (schema.TraceTotals, error) {
	var t schema.TraceTotals
	for _, items := range m.priorities {
		t.Manifests++
		t.Traces++
		t.Items += int64(len(items))
	}
	for _, items := range m.predicted {
		t.Manifests++
		t.Traces++
		t.Items += int64(len(items))
	}
	return t, m.fail
}

func (m *memIndex) PredictedPriority(_ context.Context, repository, manifest string) ([]schema.PriorityItem, error) {
	return m.predicted[repository+"@"+manifest], m.fail
}

func (m *memIndex) TracePriority(_ context.Context, repository, manifest string) ([]schema.PriorityItem, error) {
	return m.priorities[repository+"@"+manifest], m.fail
}

func (m *memIndex) PreviousTracedManifest(_ context.Context, repository, manifest string) (string, error) {
	return m.previous[repository+"@"+manifest], m.fail
}

func (m *memIndex) AllTracedChunks(_ context.Context, fn func(schema.TracedChunk)) error {
	for _, items := range m.priorities {
		for i, it := range items {
			fn(schema.TracedChunk{Digest: it.Digest, ChunkOffset: it.ChunkOffset, Whole: it.Whole,
				Position: int64(i), Items: int64(len(items))})
		}
	}
	return m.fail
}

func (m *memIndex) TracedChunksOf(ctx context.Context, manifest string, fn func(schema.TracedChunk)) error {
	held := map[string]bool{}
	for _, d := range m.manifests[manifest] {
		for _, e := range m.layers[d].Entries {
			held[e.Digest] = e.Digest != ""
		}
	}
	return m.AllTracedChunks(ctx, func(c schema.TracedChunk) {
		if held[c.Digest] {
			fn(c)
		}
	})
}

// memBlobs is an in-memory BlobOpener.
type memBlobs map[digest.Digest][]byte

func (b memBlobs) put(blob []byte) digest.Digest {
	d := digest.FromBytes(blob)
	b[d] = blob
	return d
}

func (b memBlobs) OpenBlob(_ context.Context, _ string, d digest.Digest) (io.ReadSeekCloser, error) {
	blob, ok := b[d]
	if !ok {
		return nil, fmt.Errorf("blob %s: %w", d, fs.ErrNotExist)
	}
	return nopCloser{bytes.NewReader(blob)}, nil
}

type nopCloser struct{ io.ReadSeeker }

func (nopCloser) Close() error { return nil }

// memScene builds images over memIndex and memBlobs. Layer blobs are
// never stored: Plan only reads manifests and configs.
type memScene struct {
	idx   *memIndex
	blobs memBlobs
	off   int64 // next compressed offset handed out
}

func newMemScene() *memScene { return &memScene{idx: newMemIndex(), blobs: memBlobs{}} }

// file is a regular file of content (chunks of 4 bytes) or, for an empty
// content, a directory.
func (s *memScene) file(name, content string) api.Entry {
	if content == "" {
		return api.Entry{Name: name, Type: api.TypeDir, Mode: 0o755, ModTime: time.Unix(0, 0).UTC()}
	}
	e := api.Entry{Name: name, Type: api.TypeReg, Mode: 0o644, Size: int64(len(content)),
		ModTime: time.Unix(0, 0).UTC(), Digest: digest.FromString(content).String()}
	for off := 0; off < len(content); off += 4 {
		c := content[off:min(off+4, len(content))]
		e.Chunks = append(e.Chunks, api.Chunk{Offset: int64(off), Size: int64(len(c)),
			Digest: digest.FromString(c).String(), CompressedOffset: s.off, CompressedSize: 30})
		s.off += 30
	}
	return e
}

func (s *memScene) layer(seed string, entries ...api.Entry) string {
	d := digest.FromString("layer " + seed).String()
	s.idx.layers[d] = api.LayerTree{Digest: d, DiffID: digest.FromString("diff " + seed).String(), Size: s.off, Entries: entries}
	return d
}

// image stores the manifest and config of a converted image over layers
// and indexes it.
func (s *memScene) image(layers ...string) digest.Digest {
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, Layers: []ocispec.Descriptor{}}
	m.SchemaVersion = 2
	cb, _ := json.Marshal(ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}})
	m.Config = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: s.blobs.put(cb), Size: int64(len(cb))}
	for _, l := range layers {
		m.Layers = append(m.Layers, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.Digest(l)})
	}
	mb, _ := json.Marshal(m)
	md := s.blobs.put(mb)
	s.idx.manifests[md.String()] = layers
	return md
}

// pushed stores a pushed manifest over layers that converted to converted.
func (s *memScene) pushed(repository string, converted digest.Digest, layers ...string) {
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest}
	m.SchemaVersion = 2
	for _, l := range layers {
		m.Layers = append(m.Layers, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.Digest(l)})
	}
	mb, _ := json.Marshal(m)
	k := repository + "@" + converted.String()
	s.idx.originals[k] = append(s.idx.originals[k], s.blobs.put(mb).String())
}

// traced records the merged priority of manifest as whole-file items.
func (s *memScene) traced(repository string, manifest digest.Digest, names ...string) {
	var items []schema.PriorityItem
	for _, name := range names {
		for _, d := range s.idx.manifests[manifest.String()] {
			for _, e := range s.idx.layers[d].Entries {
				if e.Name == name {
					items = append(items, schema.PriorityItem{Layer: d, Name: name, Digest: e.Digest, Whole: true, Runs: 1})
				}
			}
		}
	}
	s.idx.priorities[repository+"@"+manifest.String()] = items
}

// TestPlanFake checks the planner's choices over the in-memory index:
// which contents travel, from where, in what order, with what statistics.
func TestPlanFake(t *testing.T) {
	type images struct {
		app, other, v2 digest.Digest
		base, top, lib string
	}
	// app = base + top; other = lib; v2 = base + a new top. Contents:
	// "shared" is in base, top and lib; "dup" twice in base; "big" has 3
	// chunks.
	build := func(s *memScene) images {
		var im images
		im.base = s.layer("base", s.file("etc", ""), s.file("etc/shared", "shared!"),
			s.file("etc/dup1", "dup"), s.file("etc/dup2", "dup"), s.file("bin/big", "0123456789"))
		im.top = s.layer("top", s.file("etc/shared", "shared!"), s.file("app/main", "main v1"))
		im.lib = s.layer("lib", s.file("lib/shared", "shared!"), s.file("lib/own", "own"))
		im.app = s.image(im.base, im.top)
		im.other = s.image(im.lib)
		im.v2 = s.image(im.base, s.layer("top2", s.file("app/main", "main v2"), s.file("app/conf", "conf")))
		return im
	}
	defaultApp := []string{"etc/shared@0", "etc/shared@4", "etc/dup1@0", "bin/big@0", "bin/big@4", "bin/big@8",
		"app/main@0", "app/main@4"}
	for _, tc := range []struct {
		name     string
		setup    func(*memScene, images) (repo string, m digest.Digest, req api.DeltaRequest, pr Priority)
		want     []string // frames as "name@offset"
		dedup    bool     // some content is held
		contents int
	}{
		{
			name: "nothing held: every content once, layer then TOC order",
			setup: func(s *memScene, im images) (string, digest.Digest, api.DeltaRequest, Priority) {
				return "app", im.app, api.DeltaRequest{}, nil
			},
			want: defaultApp, contents: 4,
		},
		{
			name: "base held: only the top's new content",
			setup: func(s *memScene, im images) (string, digest.Digest, api.DeltaRequest, Priority) {
				return "app", im.app, api.DeltaRequest{Have: []string{im.base}}, nil
			},
			want: []string{"app/main@0", "app/main@4"}, dedup: true, contents: 1,
		},
		{
			name: "a layer of another image held, listed twice",
			setup: func(s *memScene, im images) (string, digest.Digest, api.DeltaRequest, Priority) {
				return "app", im.app, api.DeltaRequest{Have: []string{im.lib, im.lib}}, nil
			},
			want: defaultApp[2:], dedup: true, contents: 3,
		},
		{
			name: "an unknown layer held",
			setup: func(s *memScene, im images) (string, digest.Digest, api.DeltaRequest, Priority) {
				return "app", im.app, api.DeltaRequest{Have: []string{digest.FromString("unknown").String()}}, nil
			},
			want: defaultApp, contents: 4,
		},
		{
			name: "whole image held",
			setup: func(s *memScene, im images) (string, digest.Digest, api.DeltaRequest, Priority) {
				return "app", im.app, api.DeltaRequest{Have: []string{im.top, im.base}}, nil
			},
			want: nil, dedup: true, contents: 0,
		},
		{
			name: "traced: the manifest's own priority first",
			setup: func(s *memScene, im images) (string, digest.Digest, api.DeltaRequest, Priority) {
				s.traced("app", im.app, "app/main", "etc/dup2")
				return "app", im.app, api.DeltaRequest{}, NewTraced(s.idx)
			},
			want: []string{"app/main@0", "app/main@4", "etc/dup1@0", "etc/shared@0", "etc/shared@4",
				"bin/big@0", "bin/big@4", "bin/big@8"},
			contents: 4,
		},
		{
			name: "traced: a new version inherits by path, other images' traces follow",
			setup: func(s *memScene, im images) (string, digest.Digest, api.DeltaRequest, Priority) {
				s.traced("app", im.app, "app/main", "bin/big")
				s.traced("other", im.other, "lib/own", "lib/shared")
				s.idx.previous["app@"+im.v2.String()] = im.app.String()
				return "app", im.v2, api.DeltaRequest{}, NewTraced(s.idx)
			},
			// app/main by path (the v2 content), bin/big by path; then
			// "shared", which other traced; then the rest in TOC order.
			want: []string{"app/main@0", "app/main@4", "bin/big@0", "bin/big@4", "bin/big@8",
				"etc/shared@0", "etc/shared@4", "etc/dup1@0", "app/conf@0"},
			contents: 5,
		},
		{
			name: "resume keeps the header",
			setup: func(s *memScene, im images) (string, digest.Digest, api.DeltaRequest, Priority) {
				return "app", im.app, api.DeltaRequest{Resume: 3}, nil
			},
			want: defaultApp, contents: 4,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newMemScene()
			im := build(s)
			repo, m, req, pr := tc.setup(s, im)
			p := New(s.idx, s.blobs)
			if pr != nil {
				p.WithPriority(pr)
			}
			h, srcs, err := p.Plan(context.Background(), repo, m, req)
			if err != nil {
				t.Fatal(err)
			}
			if got := frameNames(h); !slices.Equal(got, tc.want) {
				t.Errorf("frames\n got %v\nwant %v", got, tc.want)
			}
			if h.Resume != req.Resume || len(srcs) != len(h.Frames) {
				t.Errorf("resume %d, %d sources for %d frames", h.Resume, len(srcs), len(h.Frames))
			}
			// Every frame comes from the first layer holding its content.
			for i, f := range h.Frames {
				for _, l := range h.Layers {
					if slices.ContainsFunc(l.Entries, func(e api.Entry) bool { return e.Digest == f.Digest }) {
						if srcs[i].Layer.String() != l.Digest {
							t.Errorf("frame %d taken from %s, not from the first layer holding it (%s)", i, srcs[i].Layer, l.Digest)
						}
						break
					}
				}
			}
			st := h.Stats
			var send int64
			for _, f := range h.Frames {
				send += f.CompressedSize
			}
			if st.SendBytes != send || st.ImageBytes != st.SendBytes+st.DedupBytes || (st.DedupBytes > 0) != tc.dedup ||
				st.Contents != tc.contents {
				t.Errorf("stats %+v: send %d, dedup %v, %d contents", st, send, tc.dedup, tc.contents)
			}
			// Identical requests, identical plans.
			again, _, err := p.Plan(context.Background(), repo, m, req)
			if err != nil || !slices.Equal(again.Frames, h.Frames) {
				t.Errorf("a second plan differs (%v)", err)
			}
		})
	}
}

func TestPlanFakeOriginals(t *testing.T) {
	s := newMemScene()
	base := s.layer("base", s.file("a", "aaaa"))
	top := s.layer("top", s.file("b", "bbbb"))
	m := s.image(base, top)
	gz := func(n string) string { return digest.FromString("gzip " + n).String() }
	s.pushed("app", m, gz("base"), gz("top"))
	s.pushed("app", m, gz("base"), gz("top-recompressed"))
	h, _, err := New(s.idx, s.blobs).Plan(context.Background(), "app", m, api.DeltaRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if got := []string{h.Layers[0].OriginalDigest, h.Layers[1].OriginalDigest}; !slices.Equal(got, []string{gz("base"), ""}) {
		t.Errorf("original digests %v: want the base's, and none where the pushes disagree", got)
	}
}

// TestPlanFakeNoLayers checks that a manifest without layers (an image
// of only a config) plans an empty bundle whose header lists no layers as
// [], not null.
func TestPlanFakeNoLayers(t *testing.T) {
	s := newMemScene()
	m := s.image()
	h, srcs, err := New(s.idx, s.blobs).Plan(context.Background(), "app", m, api.DeltaRequest{})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(h)
	if len(srcs) != 0 || !bytes.Contains(b, []byte(`"layers":[]`)) {
		t.Errorf("%d sources, header %s", len(srcs), b)
	}
}

func TestPlanFakeErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(s *memScene, m digest.Digest, l string) (digest.Digest, api.DeltaRequest)
		is    error // wrapped by the error; nil: any error but ErrBadRequest and ErrNotFound
	}{
		{"manifest not converted", func(s *memScene, m digest.Digest, l string) (digest.Digest, api.DeltaRequest) {
			return digest.FromString("pushed, not converted"), api.DeltaRequest{}
		}, ErrNotFound},
		{"a layer not indexed", func(s *memScene, m digest.Digest, l string) (digest.Digest, api.DeltaRequest) {
			delete(s.idx.layers, l)
			return m, api.DeltaRequest{}
		}, nil},
		{"index fails", func(s *memScene, m digest.Digest, l string) (digest.Digest, api.DeltaRequest) {
			s.idx.fail = errors.New("database is gone")
			return m, api.DeltaRequest{}
		}, nil},
		{"manifest blob missing", func(s *memScene, m digest.Digest, l string) (digest.Digest, api.DeltaRequest) {
			delete(s.blobs, m)
			return m, api.DeltaRequest{}
		}, fs.ErrNotExist},
		{"index and manifest disagree", func(s *memScene, m digest.Digest, l string) (digest.Digest, api.DeltaRequest) {
			s.idx.manifests[m.String()] = []string{l, l}
			return m, api.DeltaRequest{}
		}, nil},
		{"invalid entry in the index", func(s *memScene, m digest.Digest, l string) (digest.Digest, api.DeltaRequest) {
			tree := s.idx.layers[l]
			tree.Entries = []api.Entry{{Name: "../escape", Type: api.TypeDir}}
			s.idx.layers[l] = tree
			return m, api.DeltaRequest{}
		}, nil},
		{"chunk too big for a frame", func(s *memScene, m digest.Digest, l string) (digest.Digest, api.DeltaRequest) {
			tree := s.idx.layers[l]
			tree.Entries = slices.Clone(tree.Entries)
			tree.Entries[0].Chunks = []api.Chunk{{Size: 4, Digest: tree.Entries[0].Digest, CompressedSize: 1 << 40}}
			s.idx.layers[l] = tree
			return m, api.DeltaRequest{}
		}, nil},
		{"malformed have", func(s *memScene, m digest.Digest, l string) (digest.Digest, api.DeltaRequest) {
			return m, api.DeltaRequest{Have: []string{"sha256:nope"}}
		}, ErrBadRequest},
		{"resume past the end", func(s *memScene, m digest.Digest, l string) (digest.Digest, api.DeltaRequest) {
			return m, api.DeltaRequest{Resume: 2}
		}, ErrBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newMemScene()
			l := s.layer("only", s.file("a", "aaaa"))
			m, req := tc.setup(s, s.image(l), l)
			_, _, err := New(s.idx, s.blobs).Plan(context.Background(), "app", m, req)
			switch {
			case err == nil:
				t.Fatal("no error")
			case tc.is != nil && !errors.Is(err, tc.is):
				t.Errorf("%v, want an error wrapping %v", err, tc.is)
			case tc.is == nil && (errors.Is(err, ErrNotFound) || errors.Is(err, ErrBadRequest)):
				t.Errorf("%v: a server-side failure reported as the client's", err)
			}
		})
	}
}
