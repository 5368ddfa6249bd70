package bundle

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

// member gzips data as one gzip member, as an eStargz chunk is stored.
func member(t *testing.T, data []byte) []byte {
	t.Helper()
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	zw.Write(data)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

type content struct {
	data  []byte
	frame api.Frame
	raw   []byte
}

func newContent(t *testing.T, s string) content {
	data := []byte(s)
	raw := member(t, data)
	d := digest.FromBytes(data).String()
	return content{data: data, raw: raw, frame: api.Frame{
		Digest: d, Offset: 0, Size: int64(len(data)), ChunkDigest: d, CompressedSize: int64(len(raw)),
	}}
}

func header(cs ...content) *api.BundleHeader {
	h := &api.BundleHeader{
		ManifestDigest: digest.FromString("manifest").String(),
		Layers: []api.LayerTree{{
			Digest: digest.FromString("layer").String(),
			Entries: []api.Entry{
				{Name: "etc", Type: api.TypeDir, Mode: 0o755},
			},
		}},
	}
	for i, c := range cs {
		h.Layers[0].Entries = append(h.Layers[0].Entries, api.Entry{
			Name: fmt.Sprintf("etc/f%d", i), Type: api.TypeReg, Mode: 0o644, Size: c.frame.Size, Digest: c.frame.Digest,
			Chunks: []api.Chunk{{Size: c.frame.Size, Digest: c.frame.ChunkDigest, CompressedSize: c.frame.CompressedSize}},
		})
		h.Frames = append(h.Frames, c.frame)
	}
	return h
}

func encode(t *testing.T, h *api.BundleHeader, cs ...content) []byte {
	t.Helper()
	var b bytes.Buffer
	w, err := NewWriter(&b, h)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cs[h.Resume:] {
		if err := w.WriteFrame(bytes.NewReader(c.raw)); err != nil {
			t.Fatal(err)
		}
	}
	if len(w.Remaining()) != 0 {
		t.Fatalf("%d frames not written", len(w.Remaining()))
	}
	return b.Bytes()
}

// decodeAll reads every frame and returns the decoded chunks.
func decodeAll(r io.Reader) ([][]byte, error) {
	br, err := NewReader(r)
	if err != nil {
		return nil, err
	}
	var out [][]byte
	for {
		f, raw, err := br.Next()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		dr, err := Decode(f, raw)
		if err != nil {
			return out, err
		}
		data, err := io.ReadAll(dr)
		if err != nil {
			return out, err
		}
		out = append(out, data)
	}
}

func TestRoundTrip(t *testing.T) {
	cs := []content{newContent(t, "hello"), newContent(t, strings.Repeat("x", 100000)), newContent(t, "bye")}
	for _, resume := range []int{0, 1, 3} {
		h := header(cs...)
		h.Resume = resume
		stream := encode(t, h, cs...)
		got, err := decodeAll(bytes.NewReader(stream))
		if err != nil {
			t.Fatalf("resume %d: %v", resume, err)
		}
		if len(got) != len(cs)-resume {
			t.Fatalf("resume %d: %d frames, want %d", resume, len(got), len(cs)-resume)
		}
		for i, data := range got {
			if !bytes.Equal(data, cs[resume+i].data) {
				t.Errorf("resume %d: frame %d differs", resume, resume+i)
			}
		}
	}
}

// A member may carry bytes after the chunk (eStargz puts the next tar
// headers there): the decoder returns exactly Size bytes.
func TestDecodeTrailingData(t *testing.T) {
	data := []byte("chunk data")
	raw := member(t, append(append([]byte{}, data...), make([]byte, 1024)...))
	d := digest.FromBytes(data).String()
	f := api.Frame{Digest: d, Size: int64(len(data)), ChunkDigest: d, CompressedSize: int64(len(raw))}
	dr, err := Decode(f, bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(dr)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("got %q, %v", got, err)
	}
}

func TestRejectsCorruptStreams(t *testing.T) {
	good := []content{newContent(t, "hello"), newContent(t, "world")}
	stream := encode(t, header(good...), good...)
	hdrLen := 16 + int(binary.BigEndian.Uint64(stream[8:16]))

	withHeader := func(mutate func(h *api.BundleHeader)) []byte {
		h := header(good...)
		mutate(h)
		var b bytes.Buffer
		if _, err := NewWriter(&b, h); err != nil {
			t.Fatal(err)
		}
		// NewWriter sets the version; restore a mutated one by re-encoding.
		return b.Bytes()
	}
	wrongData := newContent(t, "hello")
	wrongData.raw = member(t, []byte("HELLO"))
	wrongData.frame.CompressedSize = int64(len(wrongData.raw))

	for _, tc := range []struct {
		name   string
		stream []byte
	}{
		{"empty", nil},
		{"bad magic", append([]byte("NOTABNDL"), stream[8:]...)},
		{"header length zero", append(append([]byte(Magic), make([]byte, 8)...), stream[16:]...)},
		{"header length huge", func() []byte {
			b := append([]byte{}, stream...)
			binary.BigEndian.PutUint64(b[8:16], 1<<62)
			return b
		}()},
		{"truncated header", stream[:hdrLen-3]},
		{"header not gzip", append(append([]byte(Magic), 0, 0, 0, 0, 0, 0, 0, 4), []byte("abcd")...)},
		{"truncated frame", stream[:len(stream)-5]},
		{"missing frame", stream[:hdrLen+int(good[0].frame.CompressedSize)]},
		{"corrupt frame bytes", func() []byte {
			b := append([]byte{}, stream...)
			b[hdrLen+12] ^= 0xff
			return b
		}()},
		{"digest mismatch", encode(t, header(good[0], wrongData), good[0], wrongData)},
		{"entry escapes the root", withHeader(func(h *api.BundleHeader) { h.Layers[0].Entries[1].Name = "../../etc/passwd" })},
		{"absolute entry", withHeader(func(h *api.BundleHeader) { h.Layers[0].Entries[1].Name = "/etc/passwd" })},
		{"hard link escapes", withHeader(func(h *api.BundleHeader) {
			h.Layers[0].Entries = append(h.Layers[0].Entries, api.Entry{Name: "x", Type: api.TypeHardlink, LinkName: "../x"})
		})},
		{"frame digest escapes the store", withHeader(func(h *api.BundleHeader) { h.Frames[0].Digest = "sha256:../../../../etc/passwd" })},
		{"frame digest wrong algorithm", withHeader(func(h *api.BundleHeader) {
			h.Frames[0].Digest = "sha512:" + strings.Repeat("a", 128)
		})},
		{"frame digest uppercase", withHeader(func(h *api.BundleHeader) {
			h.Frames[0].Digest = "sha256:" + strings.Repeat("A", 64)
		})},
		{"frame too large", withHeader(func(h *api.BundleHeader) { h.Frames[0].CompressedSize = MaxFrameCompressed + 1 })},
		{"negative size", withHeader(func(h *api.BundleHeader) { h.Frames[0].Size = -1 })},
		{"resume out of range", withHeader(func(h *api.BundleHeader) { h.Resume = 5 })},
		{"unknown entry type", withHeader(func(h *api.BundleHeader) { h.Layers[0].Entries[0].Type = "socket" })},
		{"frame of a content no file has", withHeader(func(h *api.BundleHeader) {
			h.Layers[0].Entries = h.Layers[0].Entries[:2]
		})},
		{"frame past the end of its content", withHeader(func(h *api.BundleHeader) { h.Frames[0].Offset = 3 })},
		{"frame larger than its content", withHeader(func(h *api.BundleHeader) { h.Frames[0].Size = 6 })},
		{"frames that repeat a chunk", withHeader(func(h *api.BundleHeader) { h.Frames[1] = h.Frames[0] })},
		{"frames that leave a gap", withHeader(func(h *api.BundleHeader) {
			e := &h.Layers[0].Entries[1]
			e.Size = 10
			e.Chunks = append(e.Chunks, api.Chunk{Offset: 5, Size: 5, Digest: e.Digest})
		})},
		{"one content, two sizes", withHeader(func(h *api.BundleHeader) {
			e := h.Layers[0].Entries[1]
			e.Name, e.Size = "etc/other", 10
			e.Chunks = append(e.Chunks, api.Chunk{Offset: 5, Size: 5, Digest: e.Digest})
			h.Layers[0].Entries = append(h.Layers[0].Entries, e)
		})},
		{"negative layer size", withHeader(func(h *api.BundleHeader) { h.Layers[0].Size = -1 })},
		{"data after the header JSON", rawHeader(t, Magic, []byte(`{"version":1,"manifestDigest":"`+digest.FromString("m").String()+`"} {}`))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := decodeAll(bytes.NewReader(tc.stream))
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("error %v does not wrap ErrCorrupt", err)
			}
		})
	}
}

func TestRejectsWrongVersion(t *testing.T) {
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	fmt.Fprintf(zw, `{"version": 99, "manifestDigest": "sha256:%x"}`, sha256.Sum256(nil))
	zw.Close()
	var pre [16]byte
	copy(pre[:], Magic)
	binary.BigEndian.PutUint64(pre[8:], uint64(b.Len()))
	_, err := NewReader(io.MultiReader(bytes.NewReader(pre[:]), &b))
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "version") {
		t.Fatalf("got %v", err)
	}
}

// rawHeader is a stream of the given magic and header JSON, compressed,
// without frames.
func rawHeader(t *testing.T, magic string, js []byte) []byte {
	t.Helper()
	z := member(t, js)
	b := append([]byte(magic), make([]byte, 8)...)
	binary.BigEndian.PutUint64(b[8:], uint64(len(z)))
	return append(b, z...)
}

// A stream cut anywhere is truncated, not corrupt only: the worker
// resumes a truncated stream and refuses a corrupt one. Streams with
// wrong contents are never reported as truncated.
func TestTruncatedStreams(t *testing.T) {
	good := []content{newContent(t, "hello"), newContent(t, strings.Repeat("long enough to span reads ", 500))}
	for _, version := range []int{VersionJSON, VersionCompact} {
		var b bytes.Buffer
		w, err := NewWriterVersion(&b, header(good...), version)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range good {
			if err := w.WriteFrame(bytes.NewReader(c.raw)); err != nil {
				t.Fatal(err)
			}
		}
		stream := b.Bytes()
		for cut := 0; cut < len(stream); cut++ {
			_, err := decodeAll(bytes.NewReader(stream[:cut]))
			if !errors.Is(err, ErrTruncated) || !errors.Is(err, ErrCorrupt) {
				t.Fatalf("version %d cut at %d of %d bytes: %v, want ErrTruncated and ErrCorrupt", version, cut, len(stream), err)
			}
		}
		// A read error (a reset connection) is kept in the error.
		reset := errors.New("connection reset by peer")
		_, err = decodeAll(io.MultiReader(bytes.NewReader(stream[:len(stream)-10]), &failingReader{reset}))
		if !errors.Is(err, ErrTruncated) || !errors.Is(err, reset) {
			t.Fatalf("version %d, connection reset: %v", version, err)
		}
		if _, err := decodeAll(bytes.NewReader(stream)); err != nil {
			t.Fatalf("version %d: whole stream: %v", version, err)
		}
	}
	wrongData := newContent(t, "hello")
	wrongData.raw = member(t, []byte("HELLO"))
	for name, stream := range map[string][]byte{
		"bad magic":       append([]byte("NOTABNDL"), make([]byte, 100)...),
		"digest mismatch": encode(t, header(wrongData), wrongData),
		"not gzip":        append(append([]byte(Magic), 0, 0, 0, 0, 0, 0, 0, 4), []byte("abcd")...),
	} {
		if _, err := decodeAll(bytes.NewReader(stream)); !errors.Is(err, ErrCorrupt) || errors.Is(err, ErrTruncated) {
			t.Errorf("%s: %v, want ErrCorrupt and not ErrTruncated", name, err)
		}
	}
}

type failingReader struct{ err error }

func (f *failingReader) Read([]byte) (int, error) { return 0, f.err }

// The limits refuse a header past them with a message that says which,
// and accept one exactly at them.
func TestHeaderLimits(t *testing.T) {
	h := richHeader(50)
	var b bytes.Buffer
	if _, err := NewWriterVersion(&b, h, VersionCompact); err != nil {
		t.Fatal(err)
	}
	stream := b.Bytes()
	size := int64(binary.BigEndian.Uint64(stream[8:16]))
	zr, err := gzip.NewReader(bytes.NewReader(stream[16 : 16+size]))
	if err != nil {
		t.Fatal(err)
	}
	js, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	items := int64(bytes.Count(js, []byte("{")) + bytes.Count(js, []byte("[")))
	for _, tc := range []struct {
		name string
		lim  Limits
		want string // "" accepts
	}{
		{"at every limit", Limits{HeaderSize: size, HeaderJSON: int64(len(js)), HeaderItems: items}, ""},
		{"compressed size", Limits{HeaderSize: size - 1}, fmt.Sprintf("header length %d out of range (1 to %d bytes)", size, size-1)},
		{"decompressed size", Limits{HeaderJSON: int64(len(js)) - 1}, fmt.Sprintf("decompressed header exceeds %d bytes", len(js)-1)},
		{"items", Limits{HeaderItems: items - 1}, fmt.Sprintf("more than %d JSON objects and arrays", items-1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewReaderLimits(bytes.NewReader(stream), tc.lim)
			switch {
			case tc.want == "" && err != nil:
				t.Fatal(err)
			case tc.want != "" && (!errors.Is(err, ErrCorrupt) || !strings.Contains(fmt.Sprint(err), tc.want)):
				t.Fatalf("got %v, want ErrCorrupt saying %q", err, tc.want)
			}
		})
	}
	// Braces and brackets inside strings are not items.
	name := strings.Repeat("{[", 100)
	hb := header(newContent(t, "x"))
	hb.Layers[0].Entries[0].Name = name
	b.Reset()
	if _, err := NewWriterVersion(&b, hb, VersionJSON); err != nil {
		t.Fatal(err)
	}
	if _, err := NewReaderLimits(bytes.NewReader(b.Bytes()), Limits{HeaderItems: 20}); err != nil {
		t.Fatalf("a name of brackets counted as items: %v", err)
	}
}
