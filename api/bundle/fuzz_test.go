package bundle

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"math"
	"reflect"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

// The fuzz targets run their seeds (f.Add and testdata/fuzz/FuzzX) as
// ordinary tests; `go test -fuzz FuzzX ./api/bundle` explores further.
// They use small limits so that an input the fuzzer grows stays cheap.
var fuzzLimits = Limits{HeaderSize: 1 << 20, HeaderJSON: 4 << 20, HeaderItems: 1 << 16}

// seedStreams are whole bundles of both versions, with and without
// resume, as the fuzzers' starting points.
func seedStreams(t testing.TB) [][]byte {
	cs := []content{newContentTB(t, "hello"), newContentTB(t, strings.Repeat("x", 3000))}
	var out [][]byte
	for _, version := range []int{VersionJSON, VersionCompact} {
		for _, resume := range []int{0, 1} {
			h := header(cs...)
			h.Resume = resume
			var b bytes.Buffer
			w, err := NewWriterVersion(&b, h, version)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range cs[resume:] {
				if err := w.WriteFrame(bytes.NewReader(c.raw)); err != nil {
					t.Fatal(err)
				}
			}
			out = append(out, b.Bytes())
		}
	}
	return out
}

func newContentTB(t testing.TB, s string) content {
	data := []byte(s)
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	zw.Write(data)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	d := digest.FromBytes(data).String()
	return content{data: data, raw: b.Bytes(), frame: api.Frame{
		Digest: d, Size: int64(len(data)), ChunkDigest: d, CompressedSize: int64(b.Len()),
	}}
}

// FuzzReader decodes whole streams, header and frames: any input is
// refused with ErrCorrupt, or yields a header that validates and frames
// whose every decoded chunk is exactly its size and matches its digest.
func FuzzReader(f *testing.F) {
	for _, s := range seedStreams(f) {
		f.Add(s)
		f.Add(s[:len(s)-3])
	}
	f.Fuzz(func(t *testing.T, stream []byte) {
		br, err := NewReaderLimits(bytes.NewReader(stream), fuzzLimits)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("refused without ErrCorrupt: %v", err)
			}
			return
		}
		h := br.Header()
		if err := ValidateHeader(h); err != nil {
			t.Fatalf("accepted a header that does not validate: %v", err)
		}
		checkExtents(t, h)
		for {
			f, raw, err := br.Next()
			if err == io.EOF {
				return
			}
			if err != nil {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("frame refused without ErrCorrupt: %v", err)
				}
				return
			}
			checkDecode(t, f, raw, nil)
		}
	})
}

// checkDecode decodes one frame and checks that what is accepted is the
// chunk (want, when known) and matches its digest.
func checkDecode(t *testing.T, f api.Frame, raw io.Reader, want []byte) {
	t.Helper()
	dr, err := Decode(f, raw)
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("Decode refused without ErrCorrupt: %v", err)
		}
		return
	}
	data, err := io.ReadAll(dr)
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("decoding failed without ErrCorrupt: %v", err)
		}
		return
	}
	if int64(len(data)) != f.Size {
		t.Fatalf("accepted %d bytes for a chunk of %d", len(data), f.Size)
	}
	if got := digest.FromBytes(data).String(); got != f.ChunkDigest {
		t.Fatalf("accepted a chunk of digest %s, the frame says %s", got, f.ChunkDigest)
	}
	if want != nil && !bytes.Equal(data, want) {
		t.Fatalf("accepted other bytes than the chunk")
	}
}

// FuzzDecode is the frame decoder alone: raw bytes claimed to be the gzip
// member of chunk. Only exactly chunk is ever accepted.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{"hello", strings.Repeat("chunk ", 1000), "x"} {
		c := newContentTB(f, s)
		f.Add(c.raw, c.data)
		f.Add(append(c.raw, "trailing tar headers"...), c.data)
		f.Add(c.raw[:len(c.raw)-1], c.data)
		f.Add(c.raw, []byte(strings.ToUpper(s)))
	}
	f.Fuzz(func(t *testing.T, raw, chunk []byte) {
		if len(chunk) == 0 {
			return // a frame is never empty (ValidateHeader)
		}
		sum := sha256.Sum256(chunk)
		d := digest.NewDigestFromBytes(digest.SHA256, sum[:]).String()
		fr := api.Frame{Digest: d, Size: int64(len(chunk)), ChunkDigest: d, CompressedSize: int64(len(raw))}
		checkDecode(t, fr, bytes.NewReader(raw), chunk)
	})
}

// FuzzHeaderJSON decodes header JSON of either version: any input is
// refused with ErrCorrupt or decodes to a valid header, which both
// writers write back to the same header.
func FuzzHeaderJSON(f *testing.F) {
	for _, h := range []*api.BundleHeader{header(newContentTB(f, "hello"), newContentTB(f, "world")), richHeader(3)} {
		for _, version := range []int{VersionJSON, VersionCompact} {
			var body any = h
			if version == VersionCompact {
				c, ok := compact(h)
				if !ok {
					f.Fatal("seed header not compactable")
				}
				body = c
			}
			js, err := json.Marshal(body)
			if err != nil {
				f.Fatal(err)
			}
			js = bytes.Replace(js, []byte(`"version":0`), []byte(`"version":`+string(rune('0'+version))), 1)
			f.Add(js, version == VersionCompact)
		}
	}
	f.Fuzz(func(t *testing.T, js []byte, compactVersion bool) {
		version := VersionJSON
		if compactVersion {
			version = VersionCompact
		}
		var z bytes.Buffer
		zw := gzip.NewWriter(&z)
		zw.Write(js)
		zw.Close()
		stream := append([]byte(magic(version)), make([]byte, 8)...)
		binary.BigEndian.PutUint64(stream[8:], uint64(z.Len()))
		stream = append(stream, z.Bytes()...)
		br, err := NewReaderLimits(bytes.NewReader(stream), fuzzLimits)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("refused without ErrCorrupt: %v", err)
			}
			return
		}
		h := br.Header()
		checkExtents(t, h)
		for _, v := range []int{VersionJSON, VersionCompact} {
			var b bytes.Buffer
			c := cloneHeader(t, h)
			if _, err := NewWriterVersion(&b, c, v); err != nil {
				t.Fatalf("writing back as version %d: %v", v, err)
			}
			back, err := NewReaderLimits(&b, fuzzLimits)
			if err != nil {
				t.Fatalf("written back as version %d, refused: %v", v, err)
			}
			if a, b := normalized(h), normalized(back.Header()); !reflect.DeepEqual(a, b) {
				ja, _ := json.Marshal(a)
				jb, _ := json.Marshal(b)
				t.Fatalf("written back as version %d, decodes to another header:\n%s\n%s", v, ja, jb)
			}
		}
	})
}

// checkExtents asserts what the store and the on-demand fetches rely on
// in an accepted header: every chunk lies inside its file, every frame
// inside its content, every compressed extent inside int64.
func checkExtents(t *testing.T, h *api.BundleHeader) {
	t.Helper()
	inside := func(off, size, total int64) bool { return off >= 0 && size >= 0 && off <= total && size <= total-off }
	sizes := map[string]int64{}
	for _, l := range h.Layers {
		for _, e := range l.Entries {
			if e.Type == api.TypeReg && e.Size > 0 {
				sizes[e.Digest] = e.Size
			}
			for _, c := range e.Chunks {
				if !inside(c.Offset, c.Size, e.Size) || !inside(c.CompressedOffset, c.CompressedSize, math.MaxInt64) {
					t.Fatalf("%s: accepted chunk %+v of a file of %d bytes", e.Name, c, e.Size)
				}
			}
		}
	}
	for _, f := range h.Frames {
		if !inside(f.Offset, f.Size, sizes[f.Digest]) {
			t.Fatalf("accepted frame %+v of a content of %d bytes", f, sizes[f.Digest])
		}
	}
}

// cloneHeader deep-copies h (NewWriterVersion sets the version).
func cloneHeader(t *testing.T, h *api.BundleHeader) *api.BundleHeader {
	b, err := json.Marshal(h)
	if err != nil {
		t.Fatalf("a decoded header does not encode: %v", err)
	}
	var c api.BundleHeader
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	return &c
}

// normalized is h without what the encodings legitimately drop: its
// version, time zones, and the difference between empty and absent.
func normalized(h *api.BundleHeader) *api.BundleHeader {
	n := *h
	n.Version = 0
	n.Layers = nil
	for _, l := range h.Layers {
		nl := l
		nl.Entries = nil
		for _, e := range l.Entries {
			e.ModTime = e.ModTime.UTC().Round(0)
			if len(e.Xattrs) == 0 {
				e.Xattrs = nil
			}
			if len(e.Chunks) == 0 {
				e.Chunks = nil
			}
			nl.Entries = append(nl.Entries, e)
		}
		n.Layers = append(n.Layers, nl)
	}
	if len(n.Frames) == 0 {
		n.Frames = nil
	}
	if len(n.Manifest) == 0 {
		n.Manifest = nil
	}
	if len(n.Config) == 0 {
		n.Config = nil
	}
	return &n
}
