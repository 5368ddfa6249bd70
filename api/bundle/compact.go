package bundle

import (
	"time"
	"unicode/utf8"

	"github.com/starlight-project/starlight/api"
)

// The compact header (version 2) carries the same api.BundleHeader as
// version 1 with less repetition, since the header is on the path to a
// usable image: a 7,000-file image's version-1 header is several hundred
// kilobytes, several round trips of a TCP connection in slow start.
//
//   - Entry keys are one or two letters, mtimes are Unix seconds and
//     nanoseconds instead of RFC 3339 strings.
//   - A chunk's digest is left out when it equals the entry's (a file of one
//     chunk: the chunk is the whole content).
//   - A frame is the position of a chunk in the trees, [layer, entry,
//     chunk], instead of a copy of its digests and sizes: a frame is always
//     a chunk of an entry of the header, copied raw from that layer's blob.
//
// The decoder rebuilds exactly the api.BundleHeader the registry planned.

type compactHeader struct {
	Version           int             `json:"version"`
	Repository        string          `json:"repository"`
	ManifestDigest    string          `json:"manifestDigest"`
	ManifestMediaType string          `json:"manifestMediaType"`
	Manifest          []byte          `json:"manifest"`
	ConfigDigest      string          `json:"configDigest"`
	Config            []byte          `json:"config"`
	Layers            []compactLayer  `json:"layers"`
	Frames            [][3]int        `json:"frames"`
	Stats             api.BundleStats `json:"stats"`
	Resume            int             `json:"resume,omitempty"`
}

type compactLayer struct {
	Digest         string         `json:"digest"`
	DiffID         string         `json:"diffID"`
	Size           int64          `json:"size"`
	OriginalDigest string         `json:"originalDigest,omitempty"`
	Entries        []compactEntry `json:"entries"`
}

type compactEntry struct {
	Name     string            `json:"n"`
	Type     string            `json:"t"`
	Mode     uint32            `json:"m"`
	UID      int               `json:"u,omitempty"`
	GID      int               `json:"g,omitempty"`
	Size     int64             `json:"s,omitempty"`
	MTime    int64             `json:"mt"`
	MTimeNs  int               `json:"mn,omitempty"`
	LinkName string            `json:"l,omitempty"`
	DevMajor int64             `json:"dj,omitempty"`
	DevMinor int64             `json:"dn,omitempty"`
	Xattrs   map[string][]byte `json:"x,omitempty"`
	Digest   string            `json:"d,omitempty"`
	Chunks   []compactChunk    `json:"c,omitempty"`
	// NameBytes and LinkNameBytes carry a name or link target that is
	// not valid UTF-8 (JSON replaces its invalid bytes in "n" and "l").
	NameBytes     []byte `json:"nb,omitempty"`
	LinkNameBytes []byte `json:"lb,omitempty"`
}

type compactChunk struct {
	Offset           int64  `json:"o,omitempty"`
	Size             int64  `json:"s"`
	Digest           string `json:"d,omitempty"` // empty: the entry's digest
	CompressedOffset int64  `json:"co"`
	CompressedSize   int64  `json:"cs"`
}

// The mtimes RFC 3339 can write, in Unix seconds.
var (
	minMTime = time.Date(0, 1, 1, 0, 0, 0, 0, time.UTC).Unix()
	maxMTime = time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC).Unix()
)

// frameKey identifies a frame by everything it carries.
type frameKey struct {
	digest      string
	offset      int64
	size        int64
	chunkDigest string
	compressed  int64
}

func keyOf(f api.Frame) frameKey {
	return frameKey{f.Digest, f.Offset, f.Size, f.ChunkDigest, f.CompressedSize}
}

// compact encodes h as version 2. ok is false when a frame is not a chunk
// of the header's trees; such a header can only be written as version 1.
// EncodeHeader writes the same JSON without building it.
func compact(h *api.BundleHeader) (c *compactHeader, ok bool) {
	positions, ok := framePositions(h)
	if !ok {
		return nil, false
	}
	c = &compactHeader{
		Version: VersionCompact, Repository: h.Repository,
		ManifestDigest: h.ManifestDigest, ManifestMediaType: h.ManifestMediaType, Manifest: h.Manifest,
		ConfigDigest: h.ConfigDigest, Config: h.Config,
		Layers: make([]compactLayer, len(h.Layers)), Frames: positions,
		Stats: h.Stats, Resume: h.Resume,
	}
	for li := range h.Layers {
		l := &h.Layers[li]
		cl := compactLayer{Digest: l.Digest, DiffID: l.DiffID, Size: l.Size, OriginalDigest: l.OriginalDigest,
			Entries: make([]compactEntry, len(l.Entries))}
		for ei := range l.Entries {
			cl.Entries[ei] = compactEntryOf(&l.Entries[ei])
		}
		c.Layers[li] = cl
	}
	return c, true
}

// compactEntryOf is the version-2 form of an entry.
func compactEntryOf(e *api.Entry) compactEntry {
	ce := compactEntry{
		Name: e.Name, Type: e.Type, Mode: e.Mode, UID: e.UID, GID: e.GID, Size: e.Size,
		LinkName: e.LinkName, DevMajor: e.DevMajor, DevMinor: e.DevMinor, Xattrs: e.Xattrs, Digest: e.Digest,
		MTime: e.ModTime.Unix(), MTimeNs: e.ModTime.Nanosecond(),
	}
	if !utf8.ValidString(e.Name) {
		ce.NameBytes = []byte(e.Name)
	}
	if !utf8.ValidString(e.LinkName) {
		ce.LinkNameBytes = []byte(e.LinkName)
	}
	for _, ch := range e.Chunks {
		cc := compactChunk{Offset: ch.Offset, Size: ch.Size, Digest: ch.Digest,
			CompressedOffset: ch.CompressedOffset, CompressedSize: ch.CompressedSize}
		if len(e.Chunks) == 1 && ch.Digest == e.Digest {
			cc.Digest = ""
		}
		ce.Chunks = append(ce.Chunks, cc)
	}
	return ce
}

// expand decodes a version-2 header. Frame positions are checked against
// the trees: a position outside them is a corrupt header.
func (c *compactHeader) expand() (*api.BundleHeader, error) {
	h := &api.BundleHeader{
		Version: c.Version, Repository: c.Repository,
		ManifestDigest: c.ManifestDigest, ManifestMediaType: c.ManifestMediaType, Manifest: c.Manifest,
		ConfigDigest: c.ConfigDigest, Config: c.Config,
		Layers: make([]api.LayerTree, len(c.Layers)), Frames: make([]api.Frame, len(c.Frames)),
		Stats: c.Stats, Resume: c.Resume,
	}
	for li := range c.Layers {
		cl := &c.Layers[li]
		l := api.LayerTree{Digest: cl.Digest, DiffID: cl.DiffID, Size: cl.Size, OriginalDigest: cl.OriginalDigest,
			Entries: make([]api.Entry, len(cl.Entries))}
		for ei := range cl.Entries {
			ce := &cl.Entries[ei]
			if ce.MTimeNs < 0 || ce.MTimeNs >= int(time.Second) {
				return nil, corrupt("layer %d entry %d: mtime nanoseconds out of range", li, ei)
			}
			// Version 1 carries RFC 3339 times, years 0 to 9999: so
			// must version 2, or the same header would not re-encode.
			if ce.MTime < minMTime || ce.MTime > maxMTime {
				return nil, corrupt("layer %d entry %d: mtime %d outside the years 0 to 9999", li, ei, ce.MTime)
			}
			e := api.Entry{
				Name: ce.Name, Type: ce.Type, Mode: ce.Mode, UID: ce.UID, GID: ce.GID, Size: ce.Size,
				ModTime:  time.Unix(ce.MTime, int64(ce.MTimeNs)).UTC(),
				LinkName: ce.LinkName, DevMajor: ce.DevMajor, DevMinor: ce.DevMinor, Xattrs: ce.Xattrs, Digest: ce.Digest,
			}
			if ce.NameBytes != nil {
				e.Name = string(ce.NameBytes)
			}
			if ce.LinkNameBytes != nil {
				e.LinkName = string(ce.LinkNameBytes)
			}
			for _, cc := range ce.Chunks {
				ch := api.Chunk{Offset: cc.Offset, Size: cc.Size, Digest: cc.Digest,
					CompressedOffset: cc.CompressedOffset, CompressedSize: cc.CompressedSize}
				if ch.Digest == "" {
					ch.Digest = e.Digest
				}
				e.Chunks = append(e.Chunks, ch)
			}
			l.Entries[ei] = e
		}
		h.Layers[li] = l
	}
	for i, pos := range c.Frames {
		li, ei, ci := pos[0], pos[1], pos[2]
		if li < 0 || li >= len(h.Layers) || ei < 0 || ei >= len(h.Layers[li].Entries) ||
			ci < 0 || ci >= len(h.Layers[li].Entries[ei].Chunks) {
			return nil, corrupt("frame %d: position %v outside the trees", i, pos)
		}
		e := &h.Layers[li].Entries[ei]
		ch := e.Chunks[ci]
		h.Frames[i] = api.Frame{Digest: e.Digest, Offset: ch.Offset, Size: ch.Size, ChunkDigest: ch.Digest, CompressedSize: ch.CompressedSize}
	}
	return h, nil
}
