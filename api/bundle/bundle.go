// Package bundle encodes and decodes the delta bundle stream of
// POST /starlight/delta. The format is documented in docs/BUNDLE.md:
//
//	magic   "SLBNDL01" or "SLBNDL02"            8 bytes
//	length  big-endian uint64                   8 bytes
//	header  gzip-compressed JSON header, length bytes: api.BundleHeader
//	        (version 1) or its compact form (version 2, compact.go)
//	frames  for each header.Frames[header.Resume:], exactly
//	        CompressedSize raw bytes of an eStargz gzip member
//
// A frame is copied from the stored layer blob without recompression. It
// decompresses to at least Size bytes; the first Size bytes are the chunk.
package bundle

import (
	"bufio"
	"bytes"
	"cmp"
	"compress/gzip"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"slices"

	"github.com/starlight-project/starlight/api"
)

// Magic opens every bundle stream; its last two characters are the header
// version.
const Magic = "SLBNDL01"

// Header versions. The worker says in its delta request which it reads
// (api.DeltaRequest.HeaderVersion); a registry writes the highest both
// know, so old workers keep working with new registries.
const (
	VersionJSON    = 1 // the header is an api.BundleHeader as JSON
	VersionCompact = 2 // the header is compactHeader as JSON
	// Version is the highest version this package writes and reads.
	Version = VersionCompact
)

// NegotiateVersion is the header version to write for a client that reads
// up to requested (api.DeltaRequest.HeaderVersion): the highest both
// know, VersionJSON for a client that says nothing.
func NegotiateVersion(requested int) int {
	return min(max(requested, VersionJSON), Version)
}

func magic(version int) string { return fmt.Sprintf("SLBNDL%02d", version) }

// Limits that protect a decoder from hostile or broken streams
// (docs/BUNDLE.md §7).
const (
	MaxHeaderSize        = 256 << 20 // compressed header bytes
	MaxHeaderJSON        = 1 << 30   // decompressed header bytes
	MaxFrameCompressed   = 64 << 20  // one gzip member
	MaxFrameUncompressed = 64 << 20  // one chunk
	// MaxHeaderItems bounds the JSON objects and arrays of a header: a
	// file costs about four (its entry, its chunk list, a chunk, a
	// frame), so this admits images of about two million files.
	MaxHeaderItems = 8 << 20
)

// Limits bound what a Reader accepts. The header is the only part of a
// bundle a reader holds in memory, so they bound the memory a broken or
// hostile registry can make a worker spend before anything is validated.
type Limits struct {
	// HeaderSize bounds the compressed header: the length the preamble
	// announces.
	HeaderSize int64
	// HeaderJSON bounds the decompressed header.
	HeaderJSON int64
	// HeaderItems bounds the JSON objects and arrays of the header
	// (layers, entries, chunks, frames): each costs a few hundred bytes
	// once decoded however few it takes in the JSON, so a header of tiny
	// entries would otherwise cost many times HeaderJSON.
	HeaderItems int64
}

// DefaultLimits are the limits NewReader applies.
var DefaultLimits = Limits{HeaderSize: MaxHeaderSize, HeaderJSON: MaxHeaderJSON, HeaderItems: MaxHeaderItems}

var (
	// ErrCorrupt is wrapped by every error caused by an invalid stream.
	ErrCorrupt = errors.New("corrupt bundle")
	// ErrTruncated is wrapped, besides ErrCorrupt, by the errors of a
	// stream that ended or failed before its header or a frame was
	// complete: a broken connection, which a resumed request mends,
	// rather than a registry sending something wrong. The error also
	// wraps the read error, if there was one.
	ErrTruncated = errors.New("truncated bundle")
)

// corrupt formats an ErrCorrupt error; format may use %w.
func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrCorrupt}, args...)...)
}

// truncated formats an error wrapping ErrCorrupt and ErrTruncated.
func truncated(format string, args ...any) error {
	return fmt.Errorf("%w: %w: "+format, append([]any{ErrCorrupt, ErrTruncated}, args...)...)
}

// Writer writes a bundle stream.
type Writer struct {
	w      io.Writer
	frames []api.Frame
	next   int
}

// NewWriter writes a bundle with the newest header version (Version); see
// NewWriterVersion.
func NewWriter(w io.Writer, h *api.BundleHeader) (*Writer, error) {
	return NewWriterVersion(w, h, Version)
}

// NewWriterVersion writes the magic and the header, in the given version
// (VersionJSON or VersionCompact), to w and returns a Writer for the frames
// h.Frames[h.Resume:]. h.Version is set to the version written: a header
// whose frames are not all chunks of its trees can only be written as
// VersionJSON, and is.
func NewWriterVersion(w io.Writer, h *api.BundleHeader, version int) (*Writer, error) {
	// The header's length precedes it, so it is compressed in memory. It
	// holds metadata only (file trees), never file contents. A server
	// that writes one header to many streams keeps the EncodedHeader
	// instead (EncodeHeader).
	var buf bytes.Buffer
	e, err := EncodeHeader(&buf, h, version)
	if err != nil {
		return nil, err
	}
	h.Version = e.Version() // the compact header carries its own
	if _, err := e.WriteTo(w, &buf, h.Resume); err != nil {
		return nil, err
	}
	return &Writer{w: w, frames: h.Frames, next: h.Resume}, nil
}

// WriteFrame copies the next frame's raw bytes from r, which must yield at
// least the frame's CompressedSize bytes.
func (bw *Writer) WriteFrame(r io.Reader) error {
	if bw.next >= len(bw.frames) {
		return fmt.Errorf("bundle: all %d frames already written", len(bw.frames))
	}
	f := bw.frames[bw.next]
	n, err := io.CopyN(bw.w, r, f.CompressedSize)
	if err != nil {
		return fmt.Errorf("writing frame %d (%s@%d): copied %d of %d bytes: %w", bw.next, f.Digest, f.Offset, n, f.CompressedSize, err)
	}
	bw.next++
	return nil
}

// Remaining returns the frames still to be written.
func (bw *Writer) Remaining() []api.Frame { return bw.frames[bw.next:] }

// Reader decodes a bundle stream.
type Reader struct {
	r      *bufio.Reader
	header *api.BundleHeader
	next   int
	cur    *io.LimitedReader
}

// NewReader reads and validates the header of a bundle stream, within
// DefaultLimits.
func NewReader(r io.Reader) (*Reader, error) {
	return NewReaderLimits(r, DefaultLimits)
}

// NewReaderLimits reads and validates the header of a bundle stream,
// refusing a header beyond lim (a zero field: the default).
func NewReaderLimits(r io.Reader, lim Limits) (*Reader, error) {
	lim = lim.orDefault()
	br := bufio.NewReaderSize(r, 1<<20)
	var pre [16]byte
	if n, err := io.ReadFull(br, pre[:]); err != nil {
		return nil, truncated("the stream ended after %d bytes, in the preamble: %w", n, err)
	}
	var version int
	switch string(pre[:8]) {
	case magic(VersionJSON):
		version = VersionJSON
	case magic(VersionCompact):
		version = VersionCompact
	default:
		return nil, corrupt("bad magic %q (not a Starlight bundle)", pre[:8])
	}
	n := binary.BigEndian.Uint64(pre[8:])
	if n == 0 || n > uint64(lim.HeaderSize) {
		return nil, corrupt("header length %d out of range (1 to %d bytes)", n, lim.HeaderSize)
	}
	sec := &section{r: br, left: int64(n)}
	h, err := decodeHeader(sec, version, lim)
	if err != nil {
		if sec.err != nil {
			return nil, truncated("the stream ended %d bytes into its %d-byte header: %w", int64(n)-sec.left, n, sec.err)
		}
		return nil, err
	}
	if err := ValidateHeader(h); err != nil {
		return nil, err
	}
	return &Reader{r: br, header: h, next: h.Resume}, nil
}

func (l Limits) orDefault() Limits {
	if l.HeaderSize <= 0 {
		l.HeaderSize = MaxHeaderSize
	}
	if l.HeaderJSON <= 0 {
		l.HeaderJSON = MaxHeaderJSON
	}
	if l.HeaderItems <= 0 {
		l.HeaderItems = MaxHeaderItems
	}
	return l
}

// decodeHeader decodes the compressed header of a version-version stream
// from sec, which holds exactly its bytes.
func decodeHeader(sec *section, version int, lim Limits) (*api.BundleHeader, error) {
	gz, err := gzip.NewReader(sec)
	if err != nil {
		return nil, corrupt("header: %w", err)
	}
	js := &jsonLimiter{r: gz, bytesLeft: lim.HeaderJSON, itemsLeft: lim.HeaderItems}
	dec := json.NewDecoder(js)
	var h *api.BundleHeader
	if version == VersionCompact {
		var c compactHeader
		if err := dec.Decode(&c); err != nil {
			return nil, headerError(err, lim)
		}
		if c.Version != version {
			return nil, corrupt("header version %d in a version %d stream", c.Version, version)
		}
		if h, err = c.expand(); err != nil {
			return nil, err
		}
	} else {
		h = new(api.BundleHeader)
		if err := dec.Decode(h); err != nil {
			return nil, headerError(err, lim)
		}
		if h.Version != version {
			return nil, corrupt("header version %d in a version %d stream", h.Version, version)
		}
	}
	// Nothing but whitespace may follow the JSON, up to the end of the
	// header: the frames start right after its last byte.
	rest := io.MultiReader(dec.Buffered(), js)
	if err := onlySpace(rest); err != nil {
		return nil, headerError(err, lim)
	}
	if sec.left != 0 {
		return nil, corrupt("header: the gzip data ends %d bytes before the header length", sec.left)
	}
	return h, nil
}

// headerError describes a failure to decode the header JSON.
func headerError(err error, lim Limits) error {
	switch {
	case errors.Is(err, errHeaderJSON):
		return corrupt("header: the decompressed header exceeds %d bytes", lim.HeaderJSON)
	case errors.Is(err, errHeaderItems):
		return corrupt("header: more than %d JSON objects and arrays (entries, chunks, frames): the image is larger than this reader accepts", lim.HeaderItems)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return corrupt("header: the JSON ends before it is complete: %w", err)
	}
	return corrupt("header: %w", err)
}

// onlySpace reads r to its end and fails if it holds anything but JSON
// whitespace.
func onlySpace(r io.Reader) error {
	var buf [4096]byte
	for {
		n, err := r.Read(buf[:])
		for _, c := range buf[:n] {
			if c != ' ' && c != '\t' && c != '\n' && c != '\r' {
				return fmt.Errorf("data after the header JSON")
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// section reads the left bytes of the header and remembers why the
// stream ended, if it did before them.
type section struct {
	r    io.Reader
	left int64
	err  error // the read error before the section was complete
}

func (s *section) Read(p []byte) (int, error) {
	if s.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > s.left {
		p = p[:s.left]
	}
	n, err := s.r.Read(p)
	s.left -= int64(n)
	if err != nil && s.left > 0 {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		s.err = err
		return n, err
	}
	if s.left == 0 {
		return n, nil // the stream may go on with frames
	}
	return n, nil
}

var (
	errHeaderJSON  = errors.New("header JSON too large")
	errHeaderItems = errors.New("header has too many items")
)

// jsonLimiter passes JSON through and fails once it exceeds bytesLeft
// bytes or itemsLeft objects and arrays. It tracks strings, so that a
// brace inside a name does not count.
type jsonLimiter struct {
	r         io.Reader
	bytesLeft int64
	itemsLeft int64
	inString  bool
	escaped   bool
}

func (j *jsonLimiter) Read(p []byte) (int, error) {
	if j.bytesLeft < 0 {
		return 0, errHeaderJSON
	}
	// Read one byte more than allowed, to tell "exactly at the limit"
	// from "over it".
	if int64(len(p)) > j.bytesLeft+1 {
		p = p[:j.bytesLeft+1]
	}
	n, err := j.r.Read(p)
	j.bytesLeft -= int64(n)
	if j.bytesLeft < 0 {
		return 0, errHeaderJSON
	}
	for _, c := range p[:n] {
		switch {
		case j.escaped:
			j.escaped = false
		case j.inString:
			switch c {
			case '\\':
				j.escaped = true
			case '"':
				j.inString = false
			}
		case c == '"':
			j.inString = true
		case c == '{' || c == '[':
			j.itemsLeft--
		}
	}
	if j.itemsLeft < 0 {
		return 0, errHeaderItems
	}
	return n, err
}

// ValidateHeader checks an untrusted header: version, digests, entry names
// and sizes, and that the frames are the chunks of contents the trees
// list: each frame within its content, the frames of a content covering
// it exactly once.
func ValidateHeader(h *api.BundleHeader) error {
	if h.Version != VersionJSON && h.Version != VersionCompact {
		return corrupt("unsupported version %d", h.Version)
	}
	if _, err := api.ParseDigest(h.ManifestDigest); err != nil {
		return corrupt("manifest: %w", err)
	}
	if h.Resume < 0 || h.Resume > len(h.Frames) {
		return corrupt("resume %d out of range (the header has %d frames)", h.Resume, len(h.Frames))
	}
	// sizes holds the size of every content the trees list.
	sizes := make(map[string]int64)
	for i := range h.Layers {
		l := &h.Layers[i]
		if _, err := api.ParseDigest(l.Digest); err != nil {
			return corrupt("layer %d: %w", i, err)
		}
		if l.OriginalDigest != "" {
			if _, err := api.ParseDigest(l.OriginalDigest); err != nil {
				return corrupt("layer %d: original: %w", i, err)
			}
		}
		if l.Size < 0 {
			return corrupt("layer %s: negative size %d", l.Digest, l.Size)
		}
		for j := range l.Entries {
			e := &l.Entries[j]
			if err := e.Validate(); err != nil {
				return corrupt("layer %s: %w", l.Digest, err)
			}
			if e.Type != api.TypeReg || e.Size == 0 {
				continue
			}
			if size, ok := sizes[e.Digest]; ok && size != e.Size {
				return corrupt("layer %s: %s: content %s has %d bytes, another entry says %d", l.Digest, e.Name, e.Digest, e.Size, size)
			}
			sizes[e.Digest] = e.Size
		}
	}
	type extent struct{ off, size int64 }
	extents := make(map[string][]extent)
	for i, f := range h.Frames {
		if _, err := api.ParseDigest(f.Digest); err != nil {
			return corrupt("frame %d: %w", i, err)
		}
		if _, err := api.ParseDigest(f.ChunkDigest); err != nil {
			return corrupt("frame %d: %w", i, err)
		}
		if f.Offset < 0 || f.Size <= 0 || f.Size > MaxFrameUncompressed ||
			f.CompressedSize <= 0 || f.CompressedSize > MaxFrameCompressed {
			return corrupt("frame %d: offset %d, size %d or compressed size %d out of range (sizes 1 to %d bytes)",
				i, f.Offset, f.Size, f.CompressedSize, MaxFrameCompressed)
		}
		size, ok := sizes[f.Digest]
		if !ok {
			return corrupt("frame %d carries content %s, which no file of the trees has", i, f.Digest)
		}
		if f.Size > size-f.Offset {
			return corrupt("frame %d: bytes [%d, %d+%d) lie outside content %s of %d bytes", i, f.Offset, f.Offset, f.Size, f.Digest, size)
		}
		extents[f.Digest] = append(extents[f.Digest], extent{f.Offset, f.Size})
	}
	for d, ex := range extents {
		slices.SortFunc(ex, func(a, b extent) int { return cmp.Compare(a.off, b.off) })
		var next int64
		for _, e := range ex {
			if e.off != next {
				return corrupt("the frames of content %s do not cover it once: bytes from %d come at %d", d, next, e.off)
			}
			next += e.size
		}
		if next != sizes[d] {
			return corrupt("the frames of content %s cover %d of its %d bytes", d, next, sizes[d])
		}
	}
	return nil
}

// Header returns the validated header.
func (br *Reader) Header() *api.BundleHeader { return br.header }

// Next returns the next frame and a reader of its raw compressed bytes,
// valid until the following call. It returns io.EOF after the last frame.
// A stream that ends early yields an error wrapping ErrCorrupt and
// ErrTruncated.
func (br *Reader) Next() (api.Frame, io.Reader, error) {
	if br.cur != nil && br.cur.N > 0 {
		if _, err := io.Copy(io.Discard, &truncationReader{br.cur, br.next - 1}); err != nil {
			return api.Frame{}, nil, err
		}
	}
	if br.next >= len(br.header.Frames) {
		return api.Frame{}, nil, io.EOF
	}
	f := br.header.Frames[br.next]
	br.next++
	br.cur = &io.LimitedReader{R: br.r, N: f.CompressedSize}
	return f, &truncationReader{br.cur, br.next - 1}, nil
}

// Index returns the index of the frame Next returns next.
func (br *Reader) Index() int { return br.next }

// truncationReader reads frame i and reports the end of the stream (or a
// read error) before its last byte as a truncated bundle.
type truncationReader struct {
	lr *io.LimitedReader
	i  int
}

func (t *truncationReader) Read(p []byte) (int, error) {
	n, err := t.lr.Read(p)
	if err == io.EOF && t.lr.N > 0 {
		err = io.ErrUnexpectedEOF
	}
	if err != nil && err != io.EOF {
		return n, truncated("frame %d: the stream ended %d bytes before the end of the frame: %w", t.i, t.lr.N, err)
	}
	return n, err
}

// Decode decompresses a frame's raw bytes and returns a reader of exactly
// f.Size bytes of chunk data. The reader returns an error wrapping
// ErrCorrupt at the end instead of io.EOF if the data does not match
// f.ChunkDigest, so nothing unverified is ever accepted as complete.
func Decode(f api.Frame, raw io.Reader) (io.Reader, error) {
	want, err := api.ParseDigest(f.ChunkDigest)
	if err != nil {
		return nil, corrupt("frame: %w", err)
	}
	gz, err := gzip.NewReader(raw)
	if err != nil {
		return nil, frameError(f, err)
	}
	gz.Multistream(false)
	return &verifyingReader{
		r:    io.LimitReader(gz, f.Size),
		left: f.Size,
		h:    sha256.New(),
		want: want.Encoded(),
		f:    f,
	}, nil
}

type verifyingReader struct {
	r    io.Reader
	left int64
	h    hash.Hash
	want string
	f    api.Frame
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	v.h.Write(p[:n])
	v.left -= int64(n)
	if err == io.EOF {
		if v.left != 0 {
			return n, corrupt("frame %s@%d: decompressed to %d of %d bytes", v.f.Digest, v.f.Offset, v.f.Size-v.left, v.f.Size)
		}
		if got := hex.EncodeToString(v.h.Sum(nil)); got != v.want {
			return n, corrupt("frame %s@%d: chunk digest mismatch: got sha256:%s", v.f.Digest, v.f.Offset, got)
		}
	} else if err != nil {
		return n, frameError(v.f, err)
	}
	return n, err
}

// frameError describes a failure to decompress frame f: a truncated
// stream as such, anything else as corrupt data.
func frameError(f api.Frame, err error) error {
	if errors.Is(err, ErrCorrupt) {
		return err // already says which frame, and how the stream ended
	}
	return corrupt("frame %s@%d: %w", f.Digest, f.Offset, err)
}
