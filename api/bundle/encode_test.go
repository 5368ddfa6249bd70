package bundle

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"encoding/json"
	"io"
	"reflect"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

// wantJSON is the header JSON as encoding/json writes the whole structure:
// what the writer wrote before it encoded headers piece by piece.
func wantJSON(t *testing.T, h *api.BundleHeader, version, resume int) []byte {
	t.Helper()
	c := *h
	c.Version, c.Resume = version, resume
	var body any = &c
	if version == VersionCompact {
		ch, ok := compact(&c)
		if !ok {
			t.Fatal("not compactable")
		}
		body = ch
	}
	var b bytes.Buffer
	if err := json.NewEncoder(&b).Encode(body); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// headerJSON splits a stream written by WriteTo: its magic, and the JSON
// of its one gzip member (a second member, or bytes after it, fail).
func headerJSON(t *testing.T, stream []byte) (string, []byte) {
	t.Helper()
	if len(stream) < 16 {
		t.Fatalf("stream of %d bytes", len(stream))
	}
	n := binary.BigEndian.Uint64(stream[8:16])
	if uint64(len(stream)-16) != n {
		t.Fatalf("length %d, %d bytes follow", n, len(stream)-16)
	}
	zr, err := gzip.NewReader(bytes.NewReader(stream[16:]))
	if err != nil {
		t.Fatal(err)
	}
	zr.Multistream(false)
	js, err := io.ReadAll(zr)
	if err != nil {
		t.Fatalf("decompressing the header: %v", err)
	}
	if err := zr.Reset(bytes.NewReader(nil)); err != io.EOF {
		t.Fatalf("after the member: %v", err)
	}
	return string(stream[:8]), js
}

// TestEncodeHeader: one encoding, written with any resume point, is a
// single gzip member holding byte for byte the JSON of the whole header,
// in both versions, for headers with every kind of field and for edge
// shapes (no layers, nil slices, no frames).
func TestEncodeHeader(t *testing.T) {
	empty := &api.BundleHeader{ManifestDigest: digest.FromString("m").String()}
	noFrames := richHeader(3)
	noFrames.Frames = nil
	emptyLayers := &api.BundleHeader{ManifestDigest: digest.FromString("m").String(), Layers: []api.LayerTree{}, Frames: []api.Frame{}}
	for _, tc := range []struct {
		name string
		h    *api.BundleHeader
	}{
		{"rich", richHeader(300)},
		{"nil slices", empty},
		{"empty slices", emptyLayers},
		{"no frames", noFrames},
	} {
		for _, version := range []int{VersionJSON, VersionCompact} {
			var prefix bytes.Buffer
			e, err := EncodeHeader(&prefix, tc.h, version)
			if err != nil {
				t.Fatal(err)
			}
			if e.Version() != version || e.Size() != int64(prefix.Len()) {
				t.Fatalf("%s v%d: version %d, size %d of %d", tc.name, version, e.Version(), e.Size(), prefix.Len())
			}
			for _, resume := range []int{0, 1, len(tc.h.Frames), 1234567} {
				var out bytes.Buffer
				n, err := e.WriteTo(&out, bytes.NewReader(prefix.Bytes()), resume)
				if err != nil || n != int64(out.Len()) {
					t.Fatalf("%s v%d resume %d: WriteTo %d bytes (%d): %v", tc.name, version, resume, n, out.Len(), err)
				}
				m, js := headerJSON(t, out.Bytes())
				if m != magic(version) {
					t.Errorf("%s v%d: magic %q", tc.name, version, m)
				}
				if want := wantJSON(t, tc.h, version, resume); !bytes.Equal(js, want) {
					t.Errorf("%s v%d resume %d: JSON differs:\n got %.300s\nwant %.300s", tc.name, version, resume, js, want)
				}
			}
		}
	}
}

// TestEncodedHeaderDecodes: a stream with an encoded header and a resume
// point decodes to the header as planned, with its frames.
func TestEncodedHeaderDecodes(t *testing.T) {
	cs := []content{newContent(t, "one"), newContent(t, "two"), newContent(t, "three")}
	h := header(cs...)
	for _, version := range []int{VersionJSON, VersionCompact} {
		var prefix, stream bytes.Buffer
		e, err := EncodeHeader(&prefix, h, version)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.WriteTo(&stream, &prefix, 1); err != nil {
			t.Fatal(err)
		}
		for _, c := range cs[1:] {
			stream.Write(c.raw)
		}
		br, err := NewReader(bytes.NewReader(stream.Bytes()))
		if err != nil {
			t.Fatalf("v%d: %v", version, err)
		}
		got := br.Header()
		if got.Version != version || got.Resume != 1 || !reflect.DeepEqual(got.Frames, h.Frames) {
			t.Errorf("v%d: version %d, resume %d, frames %+v", version, got.Version, got.Resume, got.Frames)
		}
		chunks, err := decodeAll(bytes.NewReader(stream.Bytes()))
		if err != nil || len(chunks) != 2 || string(chunks[1]) != "three" {
			t.Errorf("v%d: frames %q, %v", version, chunks, err)
		}
	}
}

// A prefix shorter than the encoding is an error, not a short header.
func TestEncodedHeaderShortPrefix(t *testing.T) {
	var prefix bytes.Buffer
	e, err := EncodeHeader(&prefix, richHeader(10), VersionCompact)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.WriteTo(io.Discard, bytes.NewReader(prefix.Bytes()[:prefix.Len()-1]), 0); err == nil {
		t.Fatal("WriteTo with a truncated prefix succeeded")
	}
}
