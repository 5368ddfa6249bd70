package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
)

// errNotReusable is matched by the errors of verifyEStargz that mean the
// TOC of a pushed eStargz layer does not describe its tar: the layer is
// converted from its tar instead, so that the index says what docker pull
// unpacks.
var errNotReusable = errors.New("the eStargz TOC does not describe the layer's tar")

func notReusable(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errNotReusable, fmt.Sprintf(format, args...))
}

// verifyEStargz checks that a pushed eStargz blob (ra, of size bytes),
// whose TOC gave idx, is exactly what a conversion of its own tar would
// have indexed:
//
//   - its tar passes the rules and limits of a conversion (scanTar);
//   - every entry of the tar but eStargz's own metadata is the entry of
//     idx at the same position, with the same type, mode, owner, mtime (as
//     estargz records it), size, link target, device numbers and xattrs,
//     and idx has no other entry;
//   - the content of every regular file, and every chunk of it, has the
//     digest idx gives;
//   - every chunk's gzip member, decoded as the worker decodes a bundle
//     frame (bundle.Decode), yields that chunk.
//
// So the worker, which sees a layer through its index and its members,
// sees what docker pull unpacks from its tar. verifyEStargz returns the
// tar's uncompressed size and digest (the diff_id). An error matching
// ErrInvalid is the layer's (its conversion would fail the same way); one
// matching errNotReusable means the layer must be converted instead.
func verifyEStargz(ctx context.Context, ra io.ReaderAt, size int64, idx *Index, opts Options) (int64, digest.Digest, error) {
	next := 0
	visit := func(h *tar.Header, body io.Reader) error {
		name, err := cleanTarName(h.Name)
		if err != nil || name == "" {
			return err // the root directory is not indexed; scanTar checked the name
		}
		if IsMetadataEntry(name) {
			if h.Typeflag != tar.TypeReg {
				return notReusable("metadata entry %q is not a regular file", name)
			}
			return nil
		}
		if next == len(idx.Entries) {
			return notReusable("tar entry %q is not in the TOC", name)
		}
		e := &idx.Entries[next]
		next++
		if err := sameEntry(h, name, e); err != nil {
			return err
		}
		if e.Type == api.TypeReg && e.Size > 0 {
			return checkContent(body, e)
		}
		return nil
	}
	usize, diffID, err := scanTar(ctx, io.NewSectionReader(ra, 0, size), opts, io.Discard, visit)
	if err != nil {
		return 0, "", err
	}
	if next != len(idx.Entries) {
		return 0, "", notReusable("TOC entry %q is not in the tar", idx.Entries[next].Name)
	}
	if err := checkMembers(ctx, ra, idx); err != nil {
		return 0, "", err
	}
	return usize, diffID, nil
}

// sameEntry compares a tar header with the index entry the TOC gave for
// it.
func sameEntry(h *tar.Header, name string, e *api.Entry) error {
	diff := func(what string, tarV, tocV any) error {
		return notReusable("entry %q: the tar has %s %v, the TOC %v", name, what, tarV, tocV)
	}
	if e.Name != name {
		return notReusable("tar entry %q is TOC entry %q", name, e.Name)
	}
	if t := apiType(h.Typeflag); t != e.Type {
		return diff("type", t, e.Type)
	}
	if m := uint32(h.Mode & 0o7777); m != e.Mode {
		return diff("mode", fmt.Sprintf("%#o", m), fmt.Sprintf("%#o", e.Mode))
	}
	if h.Uid != e.UID || h.Gid != e.GID {
		return diff("owner", fmt.Sprintf("%d:%d", h.Uid, h.Gid), fmt.Sprintf("%d:%d", e.UID, e.GID))
	}
	if mt := tocModTime(h.ModTime); !e.ModTime.Equal(mt) {
		return diff("mtime", mt, e.ModTime)
	}
	switch e.Type {
	case api.TypeReg:
		if h.Size != e.Size {
			return diff("size", h.Size, e.Size)
		}
	case api.TypeSymlink:
		if h.Linkname != e.LinkName {
			return diff("link target", h.Linkname, e.LinkName)
		}
	case api.TypeHardlink:
		if target, _ := cleanTarName(h.Linkname); target != e.LinkName {
			return diff("link target", target, e.LinkName)
		}
	case api.TypeChar, api.TypeBlock:
		if h.Devmajor != e.DevMajor || h.Devminor != e.DevMinor {
			return diff("device", fmt.Sprintf("%d:%d", h.Devmajor, h.Devminor), fmt.Sprintf("%d:%d", e.DevMajor, e.DevMinor))
		}
	}
	xattrs := tarXattrs(h)
	if len(xattrs) != len(e.Xattrs) {
		return diff("xattrs", len(xattrs), len(e.Xattrs))
	}
	for k, v := range xattrs {
		if tv, ok := e.Xattrs[k]; !ok || !bytes.Equal(v, tv) {
			return notReusable("entry %q: xattr %q differs between the tar and the TOC", name, k)
		}
	}
	return nil
}

// checkContent reads a regular file's content from the tar and compares
// it, chunk by chunk, with the digests of the index.
func checkContent(body io.Reader, e *api.Entry) error {
	whole := sha256.New()
	for _, c := range e.Chunks {
		ch := sha256.New()
		if _, err := io.CopyN(io.MultiWriter(whole, ch), body, c.Size); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return invalid(fmt.Errorf("layer: reading the content of %q: %w", e.Name, err))
		}
		if got := sumOf(ch); got != c.Digest {
			return notReusable("file %q: the chunk at %d has digest %s in the tar, %s in the TOC", e.Name, c.Offset, got, c.Digest)
		}
	}
	if got := sumOf(whole); got != e.Digest {
		return notReusable("file %q has digest %s in the tar, %s in the TOC", e.Name, got, e.Digest)
	}
	return nil
}

// checkMembers decodes every chunk from the gzip member the index locates
// it in, as the worker does, and checks it against its digest (which
// checkContent compared with the tar).
func checkMembers(ctx context.Context, ra io.ReaderAt, idx *Index) error {
	for i := range idx.Entries {
		e := &idx.Entries[i]
		if err := ctx.Err(); err != nil {
			return err
		}
		for _, c := range e.Chunks {
			f := api.Frame{Digest: e.Digest, Offset: c.Offset, Size: c.Size, ChunkDigest: c.Digest, CompressedSize: c.CompressedSize}
			r, err := bundle.Decode(f, io.NewSectionReader(ra, c.CompressedOffset, c.CompressedSize))
			if err == nil {
				_, err = io.Copy(io.Discard, r)
			}
			if err != nil {
				return notReusable("file %q: the member of the chunk at %d does not hold it: %v", e.Name, c.Offset, err)
			}
		}
	}
	return nil
}

// apiType maps a validated tar type flag to the index's entry type.
func apiType(t byte) string {
	switch t {
	case tar.TypeReg:
		return api.TypeReg
	case tar.TypeDir:
		return api.TypeDir
	case tar.TypeSymlink:
		return api.TypeSymlink
	case tar.TypeLink:
		return api.TypeHardlink
	case tar.TypeChar:
		return api.TypeChar
	case tar.TypeBlock:
		return api.TypeBlock
	case tar.TypeFifo:
		return api.TypeFifo
	}
	return fmt.Sprintf("tar type %q", t)
}

// tocModTime is the mtime estargz records for a tar mtime: whole seconds,
// rounded, and none (the epoch) for the zero time and for times within the
// first second of the epoch.
func tocModTime(t time.Time) time.Time {
	if t.IsZero() || t.Unix() == 0 {
		return time.Unix(0, 0).UTC()
	}
	return time.Unix(t.Round(time.Second).Unix(), 0).UTC()
}

// tarXattrs are the xattrs of a tar header, read from its PAX records as
// estargz reads them.
func tarXattrs(h *tar.Header) map[string][]byte {
	const prefix = "SCHILY.xattr."
	var out map[string][]byte
	for k, v := range h.PAXRecords {
		if strings.HasPrefix(k, prefix) {
			if out == nil {
				out = map[string][]byte{}
			}
			out[k[len(prefix):]] = []byte(v)
		}
	}
	return out
}

func sumOf(h hash.Hash) string {
	return digest.NewDigest(digest.SHA256, h).String()
}
