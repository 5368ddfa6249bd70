package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/containerd/images"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// memStore is an in-memory Store that verifies what is pushed.
type memStore struct {
	mu     sync.Mutex
	blobs  map[digest.Digest][]byte
	pushes int
}

func newMemStore() *memStore { return &memStore{blobs: map[digest.Digest][]byte{}} }

func (s *memStore) Fetch(_ context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.blobs[desc.Digest]
	if !ok {
		return nil, fmt.Errorf("%s: not found", desc.Digest)
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

func (s *memStore) Push(_ context.Context, desc ocispec.Descriptor, r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if digest.FromBytes(b) != desc.Digest || int64(len(b)) != desc.Size {
		return fmt.Errorf("pushed %s/%d does not match descriptor %s/%d", digest.FromBytes(b), len(b), desc.Digest, desc.Size)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.blobs[desc.Digest] = b
	s.pushes++
	return nil
}

func (s *memStore) add(t *testing.T, mediaType string, v any) ocispec.Descriptor {
	t.Helper()
	b, ok := v.([]byte)
	if !ok {
		var err error
		if b, err = json.Marshal(v); err != nil {
			t.Fatal(err)
		}
	}
	d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	s.blobs[d.Digest] = b
	return d
}

func (s *memStore) json(t *testing.T, d digest.Digest, v any) {
	t.Helper()
	if err := json.Unmarshal(s.blobs[d], v); err != nil {
		t.Fatalf("%s: %v", d, err)
	}
}

func simpleLayer(t *testing.T, name, content string) []byte {
	return buildTar(t, []tarEntry{
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "app/", Mode: 0755, ModTime: baseTime}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "app/" + name, Mode: 0644, Size: int64(len(content)), ModTime: baseTime}, data: []byte(content)},
	})
}

// addImage stores a two-layer image and returns its manifest descriptor.
func addImage(t *testing.T, s *memStore, docker bool, arch string) ocispec.Descriptor {
	t.Helper()
	layerType, cfgType, mfType := ocispec.MediaTypeImageLayerGzip, ocispec.MediaTypeImageConfig, ocispec.MediaTypeImageManifest
	if docker {
		layerType, cfgType, mfType = images.MediaTypeDockerSchema2LayerGzip, images.MediaTypeDockerSchema2Config, images.MediaTypeDockerSchema2Manifest
	}
	var layers []ocispec.Descriptor
	var diffIDs []digest.Digest
	for i, content := range []string{"base " + arch, strings.Repeat("app code "+arch, 2000)} {
		tb := simpleLayer(t, fmt.Sprintf("file%d", i), content)
		diffIDs = append(diffIDs, digest.FromBytes(tb))
		layers = append(layers, s.add(t, layerType, gzipBytes(t, tb)))
	}
	// Raw JSON with fields the conversion must keep untouched.
	cfg := fmt.Sprintf(`{"architecture":%q,"os":"linux","config":{"Cmd":["sh","-c","a && b < c"],"Env":["PATH=/bin"]},`+
		`"history":[{"created_by":"RUN x"}],"rootfs":{"type":"layers","diff_ids":["%s","%s"]},"x-custom":{"keep":[1,2,3]}}`,
		arch, diffIDs[0], diffIDs[1])
	cd := s.add(t, cfgType, []byte(cfg))
	m := map[string]any{"schemaVersion": 2, "mediaType": mfType, "config": cd, "layers": layers,
		"annotations": map[string]string{"org.opencontainers.image.title": "demo"}}
	return s.add(t, mfType, m)
}

func checkConvertedManifest(t *testing.T, s *memStore, mr ManifestResult) {
	t.Helper()
	var m ocispec.Manifest
	s.json(t, mr.Desc.Digest, &m)
	if m.MediaType != ocispec.MediaTypeImageManifest || m.Config.MediaType != ocispec.MediaTypeImageConfig {
		t.Errorf("converted manifest media types %q, config %q", m.MediaType, m.Config.MediaType)
	}
	if m.Annotations["org.opencontainers.image.title"] != "demo" {
		t.Errorf("manifest annotations lost: %v", m.Annotations)
	}
	var cfg map[string]json.RawMessage
	s.json(t, m.Config.Digest, &cfg)
	var rootfs ocispec.RootFS
	json.Unmarshal(cfg["rootfs"], &rootfs)
	if len(rootfs.DiffIDs) != len(m.Layers) || len(mr.Layers) != len(m.Layers) {
		t.Fatalf("%d diff_ids, %d layers, %d results", len(rootfs.DiffIDs), len(m.Layers), len(mr.Layers))
	}
	for i, l := range m.Layers {
		if l.MediaType != ocispec.MediaTypeImageLayerGzip || l.Annotations[AnnotationTOCDigest] == "" || l.Annotations[AnnotationUncompressedSize] == "" {
			t.Errorf("layer %d: %+v", i, l)
		}
		if rootfs.DiffIDs[i] != mr.Layers[i].DiffID {
			t.Errorf("layer %d: diff_id %s, converted %s", i, rootfs.DiffIDs[i], mr.Layers[i].DiffID)
		}
		if _, err := ReadIndex(bytes.NewReader(s.blobs[l.Digest]), l.Size); err != nil {
			t.Errorf("layer %d: %v", i, err)
		}
	}
	if string(cfg["history"]) != `[{"created_by":"RUN x"}]` || string(cfg["x-custom"]) != `{"keep":[1,2,3]}` ||
		string(cfg["config"]) != `{"Cmd":["sh","-c","a && b < c"],"Env":["PATH=/bin"]}` {
		t.Errorf("config fields changed: %s", s.blobs[m.Config.Digest])
	}
}

func TestConvertImageDockerManifest(t *testing.T) {
	ctx := context.Background()
	s := newMemStore()
	src := addImage(t, s, true, "amd64")
	opts, tmps := testOptions(t)

	res, err := ConvertImage(ctx, s, src, opts)
	if err != nil {
		t.Fatalf("ConvertImage: %v", err)
	}
	if res.Desc.Digest == src.Digest || len(res.Manifests) != 1 {
		t.Fatalf("result %+v", res)
	}
	mr := res.Manifests[0]
	if mr.Original.Digest != src.Digest || mr.Platform.Architecture != "amd64" || mr.Platform.OS != "linux" {
		t.Errorf("manifest result %+v", mr)
	}
	checkConvertedManifest(t, s, mr)

	// Converting the original again gives the same image.
	again, err := ConvertImage(ctx, s, src, opts)
	if err != nil {
		t.Fatal(err)
	}
	if again.Desc.Digest != res.Desc.Digest {
		t.Errorf("second conversion %s, first %s", again.Desc.Digest, res.Desc.Digest)
	}

	// Converting the converted image reuses every layer and pushes nothing.
	pushes := s.pushes
	reconv, err := ConvertImage(ctx, s, res.Desc, opts)
	if err != nil {
		t.Fatal(err)
	}
	if reconv.Desc.Digest != res.Desc.Digest || s.pushes != pushes {
		t.Errorf("re-conversion: %s (want %s), %d pushes", reconv.Desc.Digest, res.Desc.Digest, s.pushes-pushes)
	}
	for i, l := range reconv.Manifests[0].Layers {
		if !l.Reused || l.Desc.Digest != mr.Layers[i].Desc.Digest || l.DiffID != mr.Layers[i].DiffID ||
			l.Index.TOCDigest != mr.Layers[i].Index.TOCDigest || len(l.Index.Entries) != 2 || l.Index.UncompressedSize == 0 {
			t.Errorf("layer %d not reused as is: %+v", i, l)
		}
	}
	for _, d := range tmps {
		assertEmptyDir(t, d)
	}
}

func TestConvertImageIndex(t *testing.T) {
	ctx := context.Background()
	s := newMemStore()
	amd, arm := addImage(t, s, false, "amd64"), addImage(t, s, false, "arm64")
	amd.Platform = &ocispec.Platform{OS: "linux", Architecture: "amd64"}
	arm.Platform = &ocispec.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}
	arm.Annotations = map[string]string{"x": "y"}
	att := s.add(t, ocispec.MediaTypeImageManifest, []byte(`{"schemaVersion":2,"config":{}}`))
	att.Platform = &ocispec.Platform{OS: "unknown", Architecture: "unknown"}
	src := s.add(t, ocispec.MediaTypeImageIndex, ocispec.Index{
		MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{amd, arm, att},
		Annotations: map[string]string{"idx": "kept"},
	})
	opts, tmps := testOptions(t)

	res, err := ConvertImage(ctx, s, src, opts)
	if err != nil {
		t.Fatalf("ConvertImage: %v", err)
	}
	if len(res.Manifests) != 2 || res.Desc.MediaType != ocispec.MediaTypeImageIndex {
		t.Fatalf("result %+v", res)
	}
	var idx ocispec.Index
	s.json(t, res.Desc.Digest, &idx)
	if len(idx.Manifests) != 3 || idx.Annotations["idx"] != "kept" {
		t.Fatalf("converted index %+v", idx)
	}
	for i, want := range []ocispec.Descriptor{amd, arm} {
		got := idx.Manifests[i]
		if got.Digest == want.Digest || got.Digest != res.Manifests[i].Desc.Digest ||
			got.Platform == nil || platformString(*got.Platform) != platformString(*want.Platform) || fmt.Sprint(got.Annotations) != fmt.Sprint(want.Annotations) {
			t.Errorf("index entry %d: %+v", i, got)
		}
		if res.Manifests[i].Platform.Architecture != want.Platform.Architecture {
			t.Errorf("result %d platform %+v", i, res.Manifests[i].Platform)
		}
		checkConvertedManifest(t, s, res.Manifests[i])
	}
	if idx.Manifests[2].Digest != att.Digest {
		t.Errorf("attestation changed: %+v", idx.Manifests[2])
	}

	pushes := s.pushes
	reconv, err := ConvertImage(ctx, s, res.Desc, opts)
	if err != nil {
		t.Fatal(err)
	}
	if reconv.Desc.Digest != res.Desc.Digest || s.pushes != pushes {
		t.Errorf("re-conversion: %s (want %s), %d pushes", reconv.Desc.Digest, res.Desc.Digest, s.pushes-pushes)
	}
	for _, d := range tmps {
		assertEmptyDir(t, d)
	}
}

func TestConvertImageRejects(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		mutate func(s *memStore, m map[string]json.RawMessage)
		want   string
	}{
		{"foreign layer", func(s *memStore, m map[string]json.RawMessage) {
			var layers []ocispec.Descriptor
			json.Unmarshal(m["layers"], &layers)
			layers[1].MediaType = images.MediaTypeDockerSchema2LayerForeignGzip
			m["layers"], _ = json.Marshal(layers)
		}, "foreign"},
		{"diff_id mismatch", func(s *memStore, m map[string]json.RawMessage) {
			var layers []ocispec.Descriptor
			json.Unmarshal(m["layers"], &layers)
			layers[0], layers[1] = layers[1], layers[0]
			m["layers"], _ = json.Marshal(layers)
		}, "does not match the config's diff_id"},
		{"corrupt blob", func(s *memStore, m map[string]json.RawMessage) {
			var layers []ocispec.Descriptor
			json.Unmarshal(m["layers"], &layers)
			// The gzip header's MTIME: still valid gzip, another digest.
			s.blobs[layers[0].Digest][4] ^= 0xff
		}, "digest"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newMemStore()
			src := addImage(t, s, false, "amd64")
			var m map[string]json.RawMessage
			s.json(t, src.Digest, &m)
			tc.mutate(s, m)
			src = s.add(t, src.MediaType, m)
			opts, tmps := testOptions(t)
			_, err := ConvertImage(ctx, s, src, opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got error %v, want %q", err, tc.want)
			}
			for _, d := range tmps {
				assertEmptyDir(t, d)
			}
		})
	}
}
