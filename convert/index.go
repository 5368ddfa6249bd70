package convert

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

// MaxTOCSize bounds an eStargz TOC, compressed and decompressed, so that a
// hostile blob cannot make ReadIndex allocate without limit.
const MaxTOCSize = 128 << 20

// tocLimit is MaxTOCSize; tests lower it.
var tocLimit int64 = MaxTOCSize

// IsMetadataEntry reports whether a tar entry name is one of eStargz's own
// metadata entries (the prefetch landmarks and the TOC), which are part of
// a converted layer's tar but not of the image's file tree.
func IsMetadataEntry(name string) bool {
	switch strings.TrimPrefix(path.Clean("/"+name), "/") {
	case estargz.PrefetchLandmark, estargz.NoPrefetchLandmark, estargz.TOCTarName:
		return true
	}
	return false
}

// footerParser is the part of an estargz.Decompressor ReadIndex needs.
type footerParser interface {
	FooterSize() int64
	ParseFooter(p []byte) (blobPayloadSize, tocOffset, tocSize int64, err error)
	DecompressTOC(r io.Reader) (io.ReadCloser, error)
}

// ReadIndex parses the footer and TOC of an eStargz (or legacy stargz) blob
// of the given size and returns its entries in TOC order, each validated,
// with chunk locations in the blob. UncompressedSize is left 0: it is not
// recorded in the blob.
func ReadIndex(ra io.ReaderAt, size int64) (*Index, error) {
	var errs []error
	for _, p := range []footerParser{&estargz.GzipDecompressor{}, &estargz.LegacyGzipDecompressor{}} {
		toc, tocOff, tocDigest, err := readTOC(ra, size, p)
		if errors.Is(err, ErrInvalid) {
			return nil, err // too large, whatever the format
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		entries, err := tocEntries(toc, tocOff)
		if err != nil {
			return nil, invalid(fmt.Errorf("eStargz TOC: %w", err))
		}
		return &Index{TOCDigest: tocDigest, Entries: entries}, nil
	}
	return nil, fmt.Errorf("not an eStargz blob: %w", errors.Join(errs...))
}

// parseFooter is p.ParseFooter, which must not take the registry down:
// estargz v0.19.1's GzipDecompressor.ParseFooter slices the footer's gzip
// extra field by the length the field claims, not the one it has, and
// panics on a pushed blob whose footer lies about it (found by
// FuzzReadIndex).
func parseFooter(p footerParser, footer []byte) (tocOff int64, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("malformed footer: %v", r)
		}
	}()
	_, tocOff, _, err = p.ParseFooter(footer)
	return tocOff, err
}

func readTOC(ra io.ReaderAt, size int64, p footerParser) (*estargz.JTOC, int64, digest.Digest, error) {
	fsize := p.FooterSize()
	if size < fsize {
		return nil, 0, "", fmt.Errorf("blob of %d bytes is smaller than the footer", size)
	}
	footer := make([]byte, fsize)
	if _, err := ra.ReadAt(footer, size-fsize); err != nil {
		return nil, 0, "", fmt.Errorf("reading footer: %w", err)
	}
	tocOff, err := parseFooter(p, footer)
	if err != nil {
		return nil, 0, "", fmt.Errorf("parsing footer: %w", err)
	}
	if tocOff < 0 || tocOff >= size-fsize {
		return nil, 0, "", fmt.Errorf("TOC offset %d out of range", tocOff)
	}
	if tocSize := size - fsize - tocOff; tocSize > tocLimit {
		return nil, 0, "", tocTooLarge()
	}
	rc, err := p.DecompressTOC(io.NewSectionReader(ra, tocOff, size-fsize-tocOff))
	if err != nil {
		return nil, 0, "", fmt.Errorf("reading TOC: %w", err)
	}
	defer rc.Close()
	h := sha256.New()
	lr := &io.LimitedReader{R: rc, N: tocLimit + 1}
	tr := io.TeeReader(lr, h)
	var toc estargz.JTOC
	if err := json.NewDecoder(tr).Decode(&toc); err != nil {
		if lr.N == 0 {
			// The decoder ran into the cap, not into the end of the TOC.
			return nil, 0, "", tocTooLarge()
		}
		return nil, 0, "", fmt.Errorf("decoding TOC: %w", err)
	}
	// The TOC digest covers the whole JSON file, whatever the decoder left.
	if _, err := io.Copy(io.Discard, tr); err != nil {
		return nil, 0, "", fmt.Errorf("reading TOC: %w", err)
	}
	if lr.N == 0 {
		return nil, 0, "", tocTooLarge()
	}
	return &toc, tocOff, digest.NewDigest(digest.SHA256, h), nil
}

// tocWhiteout stands, in the types of tocEntries, for a name a whiteout
// hides.
const tocWhiteout = "whiteout"

// tocParentsAreDirs rejects a name below an earlier entry that is not a
// directory.
func tocParentsAreDirs(types map[string]string, name string) error {
	for p := path.Dir(name); p != "."; p = path.Dir(p) {
		if t, ok := types[p]; ok && t != api.TypeDir {
			return fmt.Errorf("its parent %q is not a directory but a %s", p, t)
		}
	}
	return nil
}

// whiteoutTarget returns the name a whiteout entry (".wh.NAME", not the
// opaque marker) hides; ok is false for other names. A whiteout hiding ""
// "." or ".." is an error, as in the worker's tree.
func whiteoutTarget(name string) (hidden string, ok bool, err error) {
	dir, base := path.Split(name)
	if !strings.HasPrefix(base, api.WhiteoutPrefix) || base == api.WhiteoutOpaque {
		return "", false, nil
	}
	h := strings.TrimPrefix(base, api.WhiteoutPrefix)
	if h == "" || h == "." || h == ".." {
		return "", false, fmt.Errorf("invalid whiteout %q", base)
	}
	return path.Join(dir, h), true, nil
}

// tocTooLarge is the error of a TOC past MaxTOCSize: the layer has too many
// entries (or too long names) to be indexed, whatever the attempt.
func tocTooLarge() error {
	return invalid(fmt.Errorf("eStargz TOC larger than %d bytes: the layer has too many entries or too long names to be indexed", tocLimit))
}

// dataRef locates the api.Chunk a TOC data entry became (entry < 0 for
// eStargz metadata entries, whose members still bound their neighbours).
type dataRef struct {
	offset       int64
	entry, chunk int
}

// tocEntries converts TOC entries into api entries. Every regular file is
// one "reg" entry followed by a "chunk" entry for each further chunk; each
// chunk's gzip member runs from its offset to the next data offset (or the
// TOC).
func tocEntries(toc *estargz.JTOC, tocOff int64) ([]api.Entry, error) {
	var (
		out     []api.Entry
		types   = map[string]string{} // name -> type, or tocWhiteout
		listed  = map[string]bool{}
		refs    []dataRef
		cur     = -1  // index in out of the regular file whose chunks follow
		covered int64 // bytes of out[cur] covered by chunks so far
	)
	addData := func(te *estargz.TOCEntry, entry int) error {
		if te.InnerOffset != 0 {
			return fmt.Errorf("entry %q: chunks sharing a gzip member (innerOffset) are not supported", te.Name)
		}
		if te.Offset <= 0 || te.Offset >= tocOff {
			return fmt.Errorf("entry %q: data offset %d outside the blob payload", te.Name, te.Offset)
		}
		if n := len(refs); n > 0 && te.Offset <= refs[n-1].offset {
			return fmt.Errorf("entry %q: data offset %d does not follow %d", te.Name, te.Offset, refs[n-1].offset)
		}
		ref := dataRef{offset: te.Offset, entry: -1}
		if entry >= 0 {
			e := &out[entry]
			size := te.ChunkSize
			if size == 0 {
				size = e.Size - te.ChunkOffset
			}
			if te.ChunkOffset != covered || size <= 0 || size > e.Size-covered {
				return fmt.Errorf("entry %q: chunk at %d+%d does not continue the file (%d of %d bytes)", e.Name, te.ChunkOffset, size, covered, e.Size)
			}
			cd := te.ChunkDigest
			if cd == "" && te.ChunkOffset == 0 && size == e.Size {
				cd = e.Digest // a single-chunk file: the chunk is the file
			}
			e.Chunks = append(e.Chunks, api.Chunk{Offset: te.ChunkOffset, Size: size, Digest: cd, CompressedOffset: te.Offset})
			covered += size
			ref.entry, ref.chunk = entry, len(e.Chunks)-1
		}
		refs = append(refs, ref)
		return nil
	}
	finish := func() error {
		if cur >= 0 && covered != out[cur].Size {
			return fmt.Errorf("entry %q: chunks cover %d of %d bytes", out[cur].Name, covered, out[cur].Size)
		}
		cur, covered = -1, 0
		return nil
	}

	for _, te := range toc.Entries {
		if te.Type == "chunk" {
			if cur < 0 {
				return nil, fmt.Errorf("chunk entry %q does not follow a regular file", te.Name)
			}
			if te.Name != "" && strings.TrimPrefix(path.Clean("/"+te.Name), "/") != out[cur].Name {
				return nil, fmt.Errorf("chunk entry %q follows regular file %q", te.Name, out[cur].Name)
			}
			if err := addData(te, cur); err != nil {
				return nil, err
			}
			continue
		}
		if err := finish(); err != nil {
			return nil, err
		}
		name, err := cleanTarName(te.Name)
		if err != nil {
			return nil, fmt.Errorf("entry %q: %w", te.Name, err)
		}
		if name == "" {
			if te.Type != api.TypeDir {
				return nil, fmt.Errorf("entry %q: the layer root must be a directory", te.Name)
			}
			continue
		}
		if IsMetadataEntry(name) {
			if te.Type == api.TypeReg && te.Size > 0 {
				if err := addData(te, -1); err != nil {
					return nil, err
				}
			}
			continue
		}
		e, err := tocEntry(te, name)
		if err != nil {
			return nil, err
		}
		// The rules of the worker's tree, in TOC order (the order it
		// applies the entries in), as tarValidator applies them to the tar.
		if err := tocParentsAreDirs(types, name); err != nil {
			return nil, fmt.Errorf("entry %q: %w", name, err)
		}
		if listed[name] {
			return nil, fmt.Errorf("entry %q: listed twice", name)
		}
		listed[name] = true
		if e.Type == api.TypeHardlink {
			t, ok := types[e.LinkName]
			if !ok || t == api.TypeDir || t == tocWhiteout {
				return nil, fmt.Errorf("hard link %q: target %q is not an earlier file", name, e.LinkName)
			}
			if err := tocParentsAreDirs(types, e.LinkName); err != nil {
				return nil, fmt.Errorf("hard link %q: target %q: %w", name, e.LinkName, err)
			}
		}
		types[name] = e.Type
		if hidden, ok, err := whiteoutTarget(name); err != nil {
			return nil, fmt.Errorf("entry %q: %w", name, err)
		} else if ok {
			types[hidden] = tocWhiteout
		}
		out = append(out, e)
		if e.Type == api.TypeReg && e.Size > 0 {
			cur = len(out) - 1
			if err := addData(te, cur); err != nil {
				return nil, err
			}
		}
	}
	if err := finish(); err != nil {
		return nil, err
	}

	// Offsets strictly increase, so a member ends where the next begins.
	for i, r := range refs {
		if r.entry < 0 {
			continue
		}
		end := tocOff
		if i+1 < len(refs) {
			end = refs[i+1].offset
		}
		out[r.entry].Chunks[r.chunk].CompressedSize = end - r.offset
	}
	for i := range out {
		if err := out[i].Validate(); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// tocEntry converts one non-chunk TOC entry.
func tocEntry(te *estargz.TOCEntry, name string) (api.Entry, error) {
	if te.Mode < 0 || te.UID < 0 || te.GID < 0 || te.DevMajor < 0 || te.DevMinor < 0 {
		return api.Entry{}, fmt.Errorf("entry %q: negative mode, owner or device number", name)
	}
	mtime := time.Unix(0, 0).UTC() // estargz leaves the epoch out
	if te.ModTime3339 != "" {
		t, err := time.Parse(time.RFC3339, te.ModTime3339)
		if err != nil {
			return api.Entry{}, fmt.Errorf("entry %q: invalid mtime: %w", name, err)
		}
		mtime = t.UTC()
	}
	e := api.Entry{
		Name:    name,
		Type:    te.Type,
		Mode:    uint32(te.Mode & 07777),
		UID:     te.UID,
		GID:     te.GID,
		ModTime: mtime,
	}
	if len(te.Xattrs) > 0 {
		e.Xattrs = te.Xattrs
	}
	switch te.Type {
	case api.TypeReg:
		e.Size = te.Size
		if te.Size > 0 {
			e.Digest = te.Digest
			if te.ChunkOffset != 0 {
				return api.Entry{}, fmt.Errorf("entry %q: first chunk at offset %d", name, te.ChunkOffset)
			}
		}
	case api.TypeSymlink:
		e.LinkName = te.LinkName
	case api.TypeHardlink:
		target, err := cleanTarName(te.LinkName)
		if err == nil && target == "" {
			err = errors.New("names the layer root")
		}
		if err != nil {
			return api.Entry{}, fmt.Errorf("hard link %q to %q: %w", name, te.LinkName, err)
		}
		e.LinkName = target
	case api.TypeChar, api.TypeBlock:
		e.DevMajor, e.DevMinor = int64(te.DevMajor), int64(te.DevMinor)
	case api.TypeDir, api.TypeFifo:
	default:
		return api.Entry{}, fmt.Errorf("entry %q: unknown type %q", name, te.Type)
	}
	return e, nil
}
