package schema

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/starlight-project/starlight/api"
)

// This file is the one mapping between an api.Entry and its rows in the
// files and chunks tables: PutLayer writes with appendFileRow, and every
// reader (GetLayer, ManifestTrees) rebuilds entries with layerEntries, so
// an entry reads back the same whichever caller asks.
//
// The entries PutLayer stores come from convert.ReadIndex, and what a
// reader gets back must equal them: the delta planner serves these trees
// to workers, which expose them as the container's files.

// modeBits are the bits of api.Entry.Mode: permissions plus setuid, setgid
// and sticky, as convert.ReadIndex keeps them from the TOC. The file type
// travels in Entry.Type, never in the mode.
const modeBits = 0o7777

// encodeMtime returns the files.mtime of an entry: nanoseconds since the
// Unix epoch, 0 for the epoch itself and for the zero time.Time, whose
// UnixNano is undefined.
func encodeMtime(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

// decodeMtime reads files.mtime back. 0 is the epoch, 1970-01-01 UTC, not
// the zero time.Time: eStargz leaves an mtime of the epoch out of the TOC
// (it cannot tell it from none), and convert.ReadIndex reads a TOC entry
// without mtime as the epoch, as extracting a tar entry of mtime 0
// (containerd's archive.Apply) sets it. So every entry read from a TOC
// round-trips exactly; the zero time.Time, which ReadIndex never
// produces, reads back as the epoch.
func decodeMtime(ns int64) time.Time { return time.Unix(0, ns).UTC() }

// A name or link target is bytes and may not be valid UTF-8, which a
// PostgreSQL TEXT column refuses. encodeText stores such a string as
// textEscape followed by its base64; it escapes a string that begins with
// textEscape the same way, so that every string reads back as it was.
// Valid names, the rest, are stored as they are.
const textEscape = "\x01"

func encodeText(s string) string {
	if utf8.ValidString(s) && !strings.HasPrefix(s, textEscape) {
		return s
	}
	return textEscape + base64.StdEncoding.EncodeToString([]byte(s))
}

func decodeText(s string) (string, error) {
	if !strings.HasPrefix(s, textEscape) {
		return s, nil
	}
	b, err := base64.StdEncoding.DecodeString(s[len(textEscape):])
	if err != nil {
		return "", fmt.Errorf("escaped name %q: %w", s, err)
	}
	return string(b), nil
}

// appendFileRow appends to row the values of fileColumns for e.
func appendFileRow(row []any, e *api.Entry) ([]any, error) {
	xattrs := ""
	if len(e.Xattrs) > 0 {
		b, err := json.Marshal(e.Xattrs) // []byte values encode as base64
		if err != nil {
			return nil, fmt.Errorf("%s: xattrs: %w", e.Name, err)
		}
		xattrs = string(b)
	}
	return append(row, encodeText(e.Name), e.Type, int64(e.Mode), e.UID, e.GID, e.Size, encodeMtime(e.ModTime),
		encodeText(e.LinkName), e.DevMajor, e.DevMinor, xattrs, e.Digest), nil
}

// fileColumns are the columns appendFileRow and scanFile cover, after
// layer_digest and position.
const fileColumns = `name, type, mode, uid, gid, size, mtime, link_name, dev_major, dev_minor, xattrs, digest`

// scanFile reads one files row, selected as "position, " + fileColumns.
func scanFile(row interface{ Scan(...any) error }) (int64, api.Entry, error) {
	var (
		pos, mode, mtime int64
		e                api.Entry
		xattrs           string
	)
	if err := row.Scan(&pos, &e.Name, &e.Type, &mode, &e.UID, &e.GID, &e.Size, &mtime,
		&e.LinkName, &e.DevMajor, &e.DevMinor, &xattrs, &e.Digest); err != nil {
		return 0, api.Entry{}, err
	}
	// Rows come from PutLayer, whose entries (convert.ReadIndex's) carry
	// no type bits; masking keeps a stray one (a row written by hand or by
	// an older writer) from reaching a worker's inode mode.
	var err error
	if e.Name, err = decodeText(e.Name); err != nil {
		return 0, api.Entry{}, err
	}
	if e.LinkName, err = decodeText(e.LinkName); err != nil {
		return 0, api.Entry{}, err
	}
	e.Mode = uint32(mode & modeBits)
	e.ModTime = decodeMtime(mtime)
	if xattrs != "" {
		if err := json.Unmarshal([]byte(xattrs), &e.Xattrs); err != nil {
			return 0, api.Entry{}, fmt.Errorf("%s: xattrs: %w", e.Name, err)
		}
	}
	return pos, e, nil
}

// maxEntriesHint bounds the capacity hint of layerEntries: it comes from
// the index itself, but only sizes the first allocation.
const maxEntriesHint = 1 << 20

// layerEntries rebuilds a layer's tree, in TOC order, from the files and
// chunks tables. Both are read in position order and merged, one query
// each, so a layer of 100k files costs two round trips and no map. hint
// is the expected number of entries (layers.files).
func (d *DB) layerEntries(ctx context.Context, e execer, layer string, hint int) ([]api.Entry, error) {
	rows, err := d.query(ctx, e, `SELECT position, `+fileColumns+`
		FROM files WHERE layer_digest = ? ORDER BY position`, layer)
	if err != nil {
		return nil, fmt.Errorf("listing files of layer %s: %w", layer, err)
	}
	hint = max(0, min(hint, maxEntriesHint))
	entries, positions := make([]api.Entry, 0, hint), make([]int64, 0, hint)
	for rows.Next() {
		pos, en, err := scanFile(rows)
		if err != nil {
			rows.Close()
			return nil, fmt.Errorf("listing files of layer %s: %w", layer, err)
		}
		entries = append(entries, en)
		positions = append(positions, pos)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("listing files of layer %s: %w", layer, err)
	}

	crows, err := d.query(ctx, e, `SELECT file_position, chunk_offset, chunk_size, chunk_digest,
		compressed_offset, compressed_size
		FROM chunks WHERE layer_digest = ? ORDER BY file_position, chunk_offset`, layer)
	if err != nil {
		return nil, fmt.Errorf("listing chunks of layer %s: %w", layer, err)
	}
	defer crows.Close()
	j := 0
	for crows.Next() {
		var pos int64
		var c api.Chunk
		if err := crows.Scan(&pos, &c.Offset, &c.Size, &c.Digest, &c.CompressedOffset, &c.CompressedSize); err != nil {
			return nil, fmt.Errorf("listing chunks of layer %s: %w", layer, err)
		}
		for j < len(positions) && positions[j] < pos {
			j++
		}
		if j == len(positions) || positions[j] != pos {
			return nil, fmt.Errorf("index of layer %s: chunk of unknown file position %d", layer, pos)
		}
		entries[j].Chunks = append(entries[j].Chunks, c)
	}
	if err := crows.Err(); err != nil {
		return nil, fmt.Errorf("listing chunks of layer %s: %w", layer, err)
	}
	return entries, nil
}
