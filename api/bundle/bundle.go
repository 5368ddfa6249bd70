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
	"compress/gzip"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"

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

// Limits that protect a decoder from hostile or broken streams.
const (
	MaxHeaderSize        = 256 << 20 // compressed header bytes
	MaxHeaderJSON        = 1 << 30   // decompressed header bytes
	MaxFrameCompressed   = 64 << 20  // one gzip member
	MaxFrameUncompressed = 64 << 20  // one chunk
)

// ErrCorrupt is wrapped by every error caused by an invalid stream.
var ErrCorrupt = errors.New("corrupt bundle")

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
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

// NewReader reads and validates the header of a bundle stream.
func NewReader(r io.Reader) (*Reader, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	var pre [16]byte
	if _, err := io.ReadFull(br, pre[:]); err != nil {
		return nil, corrupt("reading preamble: %v", err)
	}
	var version int
	switch string(pre[:8]) {
	case magic(VersionJSON):
		version = VersionJSON
	case magic(VersionCompact):
		version = VersionCompact
	default:
		return nil, corrupt("bad magic %q", pre[:8])
	}
	n := binary.BigEndian.Uint64(pre[8:])
	if n == 0 || n > MaxHeaderSize {
		return nil, corrupt("header length %d out of range", n)
	}
	gz, err := gzip.NewReader(io.LimitReader(br, int64(n)))
	if err != nil {
		return nil, corrupt("header: %v", err)
	}
	var h api.BundleHeader
	lr := &io.LimitedReader{R: gz, N: MaxHeaderJSON}
	if version == VersionCompact {
		var c compactHeader
		if err := json.NewDecoder(lr).Decode(&c); err != nil {
			return nil, corrupt("header: %v", err)
		}
		if c.Version != version {
			return nil, corrupt("header version %d in a version %d stream", c.Version, version)
		}
		ch, err := c.expand()
		if err != nil {
			return nil, err
		}
		h = *ch
	} else {
		if err := json.NewDecoder(lr).Decode(&h); err != nil {
			return nil, corrupt("header: %v", err)
		}
		if h.Version != version {
			return nil, corrupt("header version %d in a version %d stream", h.Version, version)
		}
	}
	// Drain the rest of the header member so frames start where they should.
	if _, err := io.Copy(io.Discard, gz); err != nil {
		return nil, corrupt("header: %v", err)
	}
	if err := ValidateHeader(&h); err != nil {
		return nil, err
	}
	return &Reader{r: br, header: &h, next: h.Resume}, nil
}

// ValidateHeader checks an untrusted header: version, digests, entry names
// and frame bounds.
func ValidateHeader(h *api.BundleHeader) error {
	if h.Version != VersionJSON && h.Version != VersionCompact {
		return corrupt("unsupported version %d", h.Version)
	}
	if _, err := api.ParseDigest(h.ManifestDigest); err != nil {
		return corrupt("manifest: %v", err)
	}
	if h.Resume < 0 || h.Resume > len(h.Frames) {
		return corrupt("resume %d out of range", h.Resume)
	}
	for i := range h.Layers {
		l := &h.Layers[i]
		if _, err := api.ParseDigest(l.Digest); err != nil {
			return corrupt("layer %d: %v", i, err)
		}
		if l.OriginalDigest != "" {
			if _, err := api.ParseDigest(l.OriginalDigest); err != nil {
				return corrupt("layer %d: original: %v", i, err)
			}
		}
		for j := range l.Entries {
			if err := l.Entries[j].Validate(); err != nil {
				return corrupt("layer %s: %v", l.Digest, err)
			}
		}
	}
	for i, f := range h.Frames {
		if _, err := api.ParseDigest(f.Digest); err != nil {
			return corrupt("frame %d: %v", i, err)
		}
		if _, err := api.ParseDigest(f.ChunkDigest); err != nil {
			return corrupt("frame %d: %v", i, err)
		}
		if f.Offset < 0 || f.Size <= 0 || f.Size > MaxFrameUncompressed ||
			f.CompressedSize <= 0 || f.CompressedSize > MaxFrameCompressed {
			return corrupt("frame %d: size out of range", i)
		}
	}
	return nil
}

// Header returns the validated header.
func (br *Reader) Header() *api.BundleHeader { return br.header }

// Next returns the next frame and a reader of its raw compressed bytes,
// valid until the following call. It returns io.EOF after the last frame.
// A stream that ends early yields an error wrapping ErrCorrupt.
func (br *Reader) Next() (api.Frame, io.Reader, error) {
	if br.cur != nil && br.cur.N > 0 {
		if _, err := io.Copy(io.Discard, br.cur); err != nil {
			return api.Frame{}, nil, corrupt("frame %d: %v", br.next-1, err)
		}
		if br.cur.N > 0 {
			return api.Frame{}, nil, corrupt("frame %d truncated", br.next-1)
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

type truncationReader struct {
	lr *io.LimitedReader
	i  int
}

func (t *truncationReader) Read(p []byte) (int, error) {
	n, err := t.lr.Read(p)
	if err == io.EOF && t.lr.N > 0 {
		return n, corrupt("frame %d truncated", t.i)
	}
	if err == io.ErrUnexpectedEOF {
		return n, corrupt("frame %d truncated", t.i)
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
		return nil, corrupt("frame: %v", err)
	}
	gz, err := gzip.NewReader(raw)
	if err != nil {
		return nil, corrupt("frame %s@%d: %v", f.Digest, f.Offset, err)
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
		return n, corrupt("frame %s@%d: %v", v.f.Digest, v.f.Offset, err)
	}
	return n, err
}
