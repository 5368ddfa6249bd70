package bundle

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

// richHeader is a header with every kind of entry and field: multi-chunk
// files, a content in two layers, hard links, devices, xattrs, odd modes,
// zero, pre-1970 and sub-second mtimes, a layer with an original digest.
func richHeader(files int) *api.BundleHeader {
	mtime := time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)
	shared := digest.FromString("shared").String()
	h := &api.BundleHeader{
		Repository: "app", ManifestDigest: digest.FromString("manifest").String(), ManifestMediaType: "application/vnd.oci.image.manifest.v1+json",
		Manifest: []byte(`{"schemaVersion":2}`), ConfigDigest: digest.FromString("config").String(), Config: []byte(`{}`),
		Stats: api.BundleStats{ImageBytes: 10, SendBytes: 5, Files: 3},
	}
	for l := range 2 {
		tree := api.LayerTree{Digest: digest.FromString(fmt.Sprint("layer", l)).String(), DiffID: digest.FromString(fmt.Sprint("diff", l)).String(), Size: 1234}
		if l == 1 {
			tree.OriginalDigest = digest.FromString("pushed").String()
		}
		var off int64
		tree.Entries = append(tree.Entries,
			api.Entry{Name: "d", Type: api.TypeDir, Mode: 0o1777, ModTime: time.Unix(0, 0).UTC(), Xattrs: map[string][]byte{"user.x": {0, 1}}},
			api.Entry{Name: "d/dev", Type: api.TypeChar, Mode: 0o600, DevMajor: 1, DevMinor: 3, ModTime: time.Time{}},
			api.Entry{Name: "d/old", Type: api.TypeSymlink, Mode: 0o777, LinkName: "../x", ModTime: time.Date(1960, 1, 1, 0, 0, 0, 0, time.UTC)},
			api.Entry{Name: "d/shared", Type: api.TypeReg, Mode: 0o4755, UID: 1000, GID: 1000, Size: 5, Digest: shared,
				ModTime: mtime.Add(123456789), Chunks: []api.Chunk{{Size: 5, Digest: shared, CompressedOffset: off, CompressedSize: 25 + int64(l)}}},
		)
		off += 30
		for i := range files {
			d := digest.FromString(fmt.Sprint(l, i)).String()
			e := api.Entry{Name: fmt.Sprintf("d/f%05d", i), Type: api.TypeReg, Mode: 0o644, Size: 10, Digest: d, ModTime: mtime}
			if i%100 == 0 { // a large file: three chunks
				e.Size = 30
				for c := range 3 {
					e.Chunks = append(e.Chunks, api.Chunk{Offset: int64(10 * c), Size: 10, Digest: digest.FromString(fmt.Sprint(l, i, c)).String(),
						CompressedOffset: off, CompressedSize: 20})
					off += 20
				}
			} else {
				e.Chunks = []api.Chunk{{Size: 10, Digest: d, CompressedOffset: off, CompressedSize: 20}}
				off += 20
			}
			tree.Entries = append(tree.Entries, e)
		}
		tree.Entries = append(tree.Entries, api.Entry{Name: "d/hard", Type: api.TypeHardlink, Mode: 0o644, LinkName: "d/shared", ModTime: mtime})
		h.Layers = append(h.Layers, tree)
	}
	// Frames in an order of their own: the second layer's copy of the
	// shared content, then every chunk of the first layer backwards.
	for _, e := range h.Layers[1].Entries[3:4] {
		c := e.Chunks[0]
		h.Frames = append(h.Frames, api.Frame{Digest: e.Digest, Offset: c.Offset, Size: c.Size, ChunkDigest: c.Digest, CompressedSize: c.CompressedSize})
	}
	for i := len(h.Layers[0].Entries) - 1; i >= 0; i-- {
		e := h.Layers[0].Entries[i]
		for _, c := range e.Chunks {
			if e.Digest == shared {
				continue
			}
			h.Frames = append(h.Frames, api.Frame{Digest: e.Digest, Offset: c.Offset, Size: c.Size, ChunkDigest: c.Digest, CompressedSize: c.CompressedSize})
		}
	}
	return h
}

func headerOf(t *testing.T, h *api.BundleHeader, version int) (*api.BundleHeader, int) {
	t.Helper()
	var b bytes.Buffer
	if _, err := NewWriterVersion(&b, h, version); err != nil {
		t.Fatal(err)
	}
	n := b.Len()
	br, err := NewReader(&b)
	if err != nil {
		t.Fatal(err)
	}
	return br.Header(), n
}

// TestCompactHeader: a version-2 header decodes to exactly the header a
// version-1 header decodes to, and is smaller.
func TestCompactHeader(t *testing.T) {
	h := richHeader(2000)
	v1, n1 := headerOf(t, h, VersionJSON)
	v2, n2 := headerOf(t, h, VersionCompact)
	if v1.Version != VersionJSON || v2.Version != VersionCompact {
		t.Fatalf("versions %d, %d", v1.Version, v2.Version)
	}
	v2.Version = v1.Version
	if !reflect.DeepEqual(v1, v2) {
		for i := range v1.Layers {
			for j := range v1.Layers[i].Entries {
				if a, b := v1.Layers[i].Entries[j], v2.Layers[i].Entries[j]; !reflect.DeepEqual(a, b) {
					t.Fatalf("layer %d entry %d:\nv1 %+v\nv2 %+v", i, j, a, b)
				}
			}
		}
		t.Fatal("the compact header decodes to another header")
	}
	t.Logf("header: version 1 %d bytes, version 2 %d bytes (%.1fx)", n1, n2, float64(n1)/float64(n2))
	if n2 >= n1 {
		t.Fatalf("compact header %d bytes, not smaller than %d", n2, n1)
	}
}

// A frame that is not a chunk of the trees can only be written as version
// 1: the writer falls back, and the stream still decodes.
func TestCompactFallsBack(t *testing.T) {
	c := newContent(t, "a content stored twice")
	h := header(c)
	// The frame is the copy of another member than the tree's chunk
	// (say, of a layer the header does not list).
	h.Layers[0].Entries[1].Chunks[0].CompressedSize++
	var b bytes.Buffer
	w, err := NewWriterVersion(&b, h, VersionCompact)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteFrame(bytes.NewReader(c.raw)); err != nil {
		t.Fatal(err)
	}
	if string(b.Bytes()[:8]) != magic(VersionJSON) || h.Version != VersionJSON {
		t.Fatalf("magic %q, version %d", b.Bytes()[:8], h.Version)
	}
	got, err := decodeAll(&b)
	if err != nil || len(got) != 1 || !bytes.Equal(got[0], c.data) {
		t.Fatalf("decoded %q, %v", got, err)
	}
}

// Hostile version-2 headers: frame positions outside the trees, and
// out-of-range nanoseconds, are corrupt.
func TestCompactRejectsBadPositions(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(c *compactHeader)
	}{
		{"layer", func(c *compactHeader) { c.Frames[0][0] = 7 }},
		{"negative entry", func(c *compactHeader) { c.Frames[0][1] = -1 }},
		{"entry", func(c *compactHeader) { c.Frames[0][1] = 1 << 30 }},
		{"chunk", func(c *compactHeader) { c.Frames[0][2] = 3 }},
		{"chunk of a directory", func(c *compactHeader) { c.Frames[0] = [3]int{0, 0, 0} }},
		{"nanoseconds", func(c *compactHeader) { c.Layers[0].Entries[0].MTimeNs = int(time.Second) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, ok := compact(richHeader(3))
			if !ok {
				t.Fatal("not compactable")
			}
			tc.mutate(c)
			if _, err := c.expand(); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("expand: %v, want ErrCorrupt", err)
			}
		})
	}
}
