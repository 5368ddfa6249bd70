package bundle

import (
	"bufio"
	"compress/flate"
	"encoding"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strconv"

	"github.com/starlight-project/starlight/api"
)

// EncodedHeader is a bundle header compressed once and written to any
// number of streams, each with its own resume point. A registry plans an
// image once and serves its bundle to every worker that asks, so the
// header (for 100,000 files, megabytes compressed from a tree of a few
// hundred megabytes in memory) is encoded once, streamed to where the
// caller keeps it (a spool file), and the tree is dropped.
//
// The header is one gzip member and only its end depends on the resume
// point: the JSON closes with `,"resume":N}` (nothing for 0) and a
// newline. EncodeHeader writes everything before that end: the gzip
// header and the deflate blocks of the JSON, ended by a sync flush (an
// empty stored block that is not final, so the deflate stream stops
// there byte-aligned). WriteTo sends those bytes, then the end as one
// final stored block, and the gzip trailer, whose CRC-32 continues from
// the state saved after the prefix. The result is an ordinary gzip member
// that decompresses to exactly the JSON NewWriterVersion would write for
// the same header and resume point.
type EncodedHeader struct {
	version int
	size    int64  // compressed bytes EncodeHeader wrote
	raw     int64  // uncompressed JSON bytes of the prefix
	crc     []byte // CRC-32 state after the prefix (encoding.BinaryMarshaler)
}

// maxTail bounds the end WriteTo appends: `,"resume":` and an int, `}`,
// newline; plus the stored block's 5 bytes and the 8-byte trailer.
const maxTail = 32 + 5 + 8

// gzipHeader is the member header compress/gzip writes for a Writer with
// no name, comment or modification time at the default level.
var gzipHeader = [10]byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255}

// Version returns the header version encoded (VersionJSON or
// VersionCompact).
func (e *EncodedHeader) Version() int { return e.version }

// Size returns the number of bytes EncodeHeader wrote: what WriteTo reads
// from its prefix.
func (e *EncodedHeader) Size() int64 { return e.size }

// EncodeHeader compresses h, in the given version (VersionJSON or
// VersionCompact), to dst, up to the part that depends on the resume point
// (see EncodedHeader). As NewWriterVersion, it falls back to VersionJSON
// when a frame of h is not a chunk of its trees. h.Version and h.Resume are
// ignored: the version is the one encoded, the resume point WriteTo's. The
// trees are encoded entry by entry, so encoding holds no copy of them.
func EncodeHeader(dst io.Writer, h *api.BundleHeader, version int) (*EncodedHeader, error) {
	var positions [][3]int
	switch version {
	case VersionJSON:
	case VersionCompact:
		var ok bool
		if positions, ok = framePositions(h); !ok {
			version = VersionJSON
		}
	default:
		return nil, fmt.Errorf("bundle: unknown header version %d", version)
	}
	cw := &countingWriter{w: dst}
	if _, err := cw.Write(gzipHeader[:]); err != nil {
		return nil, err
	}
	zw, err := flate.NewWriter(cw, flate.DefaultCompression)
	if err != nil {
		return nil, err
	}
	crc := crc32.NewIEEE()
	jw := &jsonWriter{w: bufio.NewWriterSize(io.MultiWriter(zw, crc), 64<<10)}
	if version == VersionCompact {
		jw.compactHeader(h, positions)
	} else {
		jw.jsonHeader(h)
	}
	if jw.err == nil {
		jw.err = jw.w.Flush()
	}
	if jw.err != nil {
		return nil, fmt.Errorf("encoding bundle header: %w", jw.err)
	}
	if err := zw.Flush(); err != nil {
		return nil, fmt.Errorf("encoding bundle header: %w", err)
	}
	state, err := crc.(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil {
		return nil, err
	}
	e := &EncodedHeader{version: version, size: cw.n, raw: jw.n, crc: state}
	if e.size+maxTail > MaxHeaderSize {
		return nil, fmt.Errorf("bundle header exceeds %d bytes compressed", MaxHeaderSize)
	}
	if e.raw+maxTail > MaxHeaderJSON {
		return nil, fmt.Errorf("bundle header exceeds %d bytes of JSON", MaxHeaderJSON)
	}
	return e, nil
}

// WriteTo writes to w the magic, the header length and the compressed
// header for a stream starting at frame resume. prefix yields the bytes
// EncodeHeader wrote (exactly Size() of them are read). It returns the
// bytes written.
func (e *EncodedHeader) WriteTo(w io.Writer, prefix io.Reader, resume int) (int64, error) {
	if resume < 0 {
		return 0, fmt.Errorf("bundle: negative resume %d", resume)
	}
	tail := make([]byte, 0, 32)
	if resume > 0 {
		tail = append(tail, `,"resume":`...)
		tail = strconv.AppendInt(tail, int64(resume), 10)
	}
	tail = append(tail, "}\n"...)

	crc := crc32.NewIEEE()
	if err := crc.(encoding.BinaryUnmarshaler).UnmarshalBinary(e.crc); err != nil {
		return 0, fmt.Errorf("bundle: restoring the header checksum: %w", err)
	}
	crc.Write(tail)
	// The end: one final stored block (BFINAL=1, BTYPE=00, then LEN and
	// its complement), starting byte-aligned after the sync flush, then
	// the gzip trailer: CRC-32 and length mod 2^32 of the whole JSON.
	end := make([]byte, 0, maxTail)
	end = append(end, 1)
	end = binary.LittleEndian.AppendUint16(end, uint16(len(tail)))
	end = binary.LittleEndian.AppendUint16(end, ^uint16(len(tail)))
	end = append(end, tail...)
	end = binary.LittleEndian.AppendUint32(end, crc.Sum32())
	end = binary.LittleEndian.AppendUint32(end, uint32(e.raw+int64(len(tail))))

	var pre [16]byte
	copy(pre[:8], magic(e.version))
	binary.BigEndian.PutUint64(pre[8:], uint64(e.size+int64(len(end))))
	var n int64
	m, err := w.Write(pre[:])
	n += int64(m)
	if err != nil {
		return n, err
	}
	c, err := io.CopyN(w, prefix, e.size)
	n += c
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = fmt.Errorf("bundle: the encoded header ends after %d of %d bytes", c, e.size)
		}
		return n, err
	}
	m, err = w.Write(end)
	n += int64(m)
	return n, err
}

// framePositions returns, for every frame of h, the position [layer,
// entry, chunk] of the first chunk of the trees it copies; ok is false
// when some frame is not a chunk of the trees.
func framePositions(h *api.BundleHeader) (positions [][3]int, ok bool) {
	at := make(map[frameKey][3]int, len(h.Frames))
	for _, f := range h.Frames {
		at[keyOf(f)] = [3]int{-1}
	}
	for li := range h.Layers {
		for ei := range h.Layers[li].Entries {
			e := &h.Layers[li].Entries[ei]
			for ci, ch := range e.Chunks {
				k := frameKey{e.Digest, ch.Offset, ch.Size, ch.Digest, ch.CompressedSize}
				if p, want := at[k]; want && p[0] < 0 {
					at[k] = [3]int{li, ei, ci}
				}
			}
		}
	}
	positions = make([][3]int, len(h.Frames))
	for i, f := range h.Frames {
		p := at[keyOf(f)]
		if p[0] < 0 {
			return nil, false
		}
		positions[i] = p
	}
	return positions, true
}

// jsonWriter writes the header JSON piece by piece, with the bytes and
// escaping encoding/json gives the whole structure (keys in field order,
// omitempty fields left out, nil slices as null), keeping the first error.
type jsonWriter struct {
	w   *bufio.Writer
	n   int64
	err error
}

func (j *jsonWriter) raw(s string) {
	if j.err == nil {
		var m int
		m, j.err = j.w.WriteString(s)
		j.n += int64(m)
	}
}

func (j *jsonWriter) bytes(b []byte) {
	if j.err == nil {
		var m int
		m, j.err = j.w.Write(b)
		j.n += int64(m)
	}
}

func (j *jsonWriter) value(v any) {
	if j.err != nil {
		return
	}
	b, err := json.Marshal(v)
	if err != nil {
		j.err = err
		return
	}
	j.bytes(b)
}

func (j *jsonWriter) int(v int64) {
	var b [20]byte
	j.bytes(strconv.AppendInt(b[:0], v, 10))
}

// field writes `,"key":` (without the comma for the first field).
func (j *jsonWriter) field(first bool, key string) {
	if !first {
		j.raw(",")
	}
	j.raw(`"` + key + `":`)
}

// common writes the fields both versions share, up to "layers".
func (j *jsonWriter) common(h *api.BundleHeader, version int) {
	j.raw("{")
	j.field(true, "version")
	j.int(int64(version))
	j.field(false, "repository")
	j.value(h.Repository)
	j.field(false, "manifestDigest")
	j.value(h.ManifestDigest)
	j.field(false, "manifestMediaType")
	j.value(h.ManifestMediaType)
	j.field(false, "manifest")
	j.value(h.Manifest)
	j.field(false, "configDigest")
	j.value(h.ConfigDigest)
	j.field(false, "config")
	j.value(h.Config)
}

// layer writes a layer's fields before its entries, and the entries key.
func (j *jsonWriter) layer(l *api.LayerTree) {
	j.raw("{")
	j.field(true, "digest")
	j.value(l.Digest)
	j.field(false, "diffID")
	j.value(l.DiffID)
	j.field(false, "size")
	j.int(l.Size)
	if l.OriginalDigest != "" {
		j.field(false, "originalDigest")
		j.value(l.OriginalDigest)
	}
	j.field(false, "entries")
}

// jsonHeader writes a version-1 header (api.BundleHeader), without its end.
func (j *jsonWriter) jsonHeader(h *api.BundleHeader) {
	j.common(h, VersionJSON)
	j.field(false, "layers")
	if h.Layers == nil {
		j.raw("null")
	} else {
		j.raw("[")
		for li := range h.Layers {
			l := &h.Layers[li]
			if li > 0 {
				j.raw(",")
			}
			j.layer(l)
			if l.Entries == nil {
				j.raw("null")
			} else {
				j.raw("[")
				for ei := range l.Entries {
					if ei > 0 {
						j.raw(",")
					}
					j.value(&l.Entries[ei])
				}
				j.raw("]")
			}
			j.raw("}")
		}
		j.raw("]")
	}
	j.field(false, "frames")
	if h.Frames == nil {
		j.raw("null")
	} else {
		j.raw("[")
		for i := range h.Frames {
			if i > 0 {
				j.raw(",")
			}
			j.value(&h.Frames[i])
		}
		j.raw("]")
	}
	j.field(false, "stats")
	j.value(h.Stats)
}

// compactHeader writes a version-2 header (compactHeader, compact.go),
// without its end, converting one entry at a time.
func (j *jsonWriter) compactHeader(h *api.BundleHeader, positions [][3]int) {
	j.common(h, VersionCompact)
	j.field(false, "layers")
	j.raw("[")
	for li := range h.Layers {
		l := &h.Layers[li]
		if li > 0 {
			j.raw(",")
		}
		j.layer(l)
		j.raw("[")
		for ei := range l.Entries {
			if ei > 0 {
				j.raw(",")
			}
			ce := compactEntryOf(&l.Entries[ei])
			j.value(&ce)
		}
		j.raw("]}")
	}
	j.raw("]")
	j.field(false, "frames")
	j.raw("[")
	for i, p := range positions {
		if i > 0 {
			j.raw(",")
		}
		j.raw("[")
		j.int(int64(p[0]))
		j.raw(",")
		j.int(int64(p[1]))
		j.raw(",")
		j.int(int64(p[2]))
		j.raw("]")
	}
	j.raw("]")
	j.field(false, "stats")
	j.value(h.Stats)
}

// countingWriter counts the bytes written through it.
type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
