package schema

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"

	"github.com/starlight-project/starlight/api"
)

// Layer is a converted (eStargz) layer blob and its file tree.
type Layer struct {
	Digest           string
	DiffID           string
	Size             int64
	TOCDigest        string
	UncompressedSize int64
	// Entries in TOC order; their position in the slice is their position
	// in the index.
	Entries []api.Entry
}

// Rows per multi-row INSERT: a few thousand bound parameters, well under
// SQLite's and PostgreSQL's limits, and few round trips for big layers.
const (
	fileBatch  = 200 // 14 columns
	chunkBatch = 300 // 7 columns
)

// IndexTxRows bounds the rows (files and chunks) one transaction of
// PutLayer writes. SQLite has one writer: a transaction holding the write
// lock for a whole 300,000-file layer made every push wait seconds for it
// (and fail once busy_timeout ran out); a few thousand rows take a few
// milliseconds.
const IndexTxRows = 4000

// PutLayer stores a layer with all its files and chunks. They are written
// in transactions of at most IndexTxRows rows, so that other writers (a
// push queuing its conversion) wait for one batch, never for the layer;
// the layer row comes last, in its own transaction, and is what makes the
// layer indexed (LayerExists, ManifestTrees): until then its rows are not
// part of any answer. A layer's digest covers its content, so the rows of
// a layer are always the same: PutLayer after a crash in the middle of it
// rewrites what is missing, and storing a layer that already exists is a
// no-op.
func (d *DB) PutLayer(ctx context.Context, l *Layer) error {
	if err := d.putLayer(ctx, l); err != nil {
		return fmt.Errorf("store layer %s: %w", l.Digest, err)
	}
	return nil
}

func (d *DB) putLayer(ctx context.Context, l *Layer) error {
	if ok, err := d.LayerExists(ctx, l.Digest); err != nil || ok {
		return err
	}
	for next := 0; next < len(l.Entries); {
		err := d.inTx(ctx, func(tx *sql.Tx) error {
			var err error
			next, err = d.insertFiles(ctx, tx, l, next, IndexTxRows)
			return err
		})
		if err != nil {
			return err
		}
		if d.afterIndexBatch != nil {
			d.afterIndexBatch(next)
		}
	}
	// ON CONFLICT DO NOTHING also makes a concurrent insert by another
	// replica wait for that one's commit, then skip.
	_, err := d.exec(ctx, d.db, `INSERT INTO layers
		(digest, diff_id, size, toc_digest, uncompressed_size, files, created_at)
		VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING`,
		l.Digest, l.DiffID, l.Size, l.TOCDigest, l.UncompressedSize, len(l.Entries), d.nowMillis())
	return err
}

// insertFiles inserts the entries of l from position start, with their
// chunks, until about maxRows rows are written, and returns the position
// of the first entry left. Rows already there (an earlier, interrupted
// PutLayer) are kept.
func (d *DB) insertFiles(ctx context.Context, tx *sql.Tx, l *Layer, start, maxRows int) (int, error) {
	const fileCols = `(layer_digest, position, ` + fileColumns + `)`
	const chunkCols = `(layer_digest, file_position, chunk_offset, chunk_size, chunk_digest,
		compressed_offset, compressed_size)`
	files := newBatcher(d, tx, "INSERT INTO files "+fileCols+" VALUES ", 14, fileBatch)
	chunks := newBatcher(d, tx, "INSERT INTO chunks "+chunkCols+" VALUES ", 7, chunkBatch)
	defer files.close()
	defer chunks.close()
	// Rows of an interrupted PutLayer are the same rows: keep them.
	files.suffix, chunks.suffix = " ON CONFLICT DO NOTHING", " ON CONFLICT DO NOTHING"
	row := make([]any, 0, 14) // reused: add copies the values
	rows := 0
	i := start
	for ; i < len(l.Entries) && rows < maxRows; i++ {
		e := &l.Entries[i]
		var err error
		if row, err = appendFileRow(append(row[:0], l.Digest, i), e); err != nil {
			return 0, err
		}
		if err := files.add(ctx, row...); err != nil {
			return 0, fmt.Errorf("%s: %w", e.Name, err)
		}
		for _, c := range e.Chunks {
			if err := chunks.add(ctx, l.Digest, i, c.Offset, c.Size, c.Digest,
				c.CompressedOffset, c.CompressedSize); err != nil {
				return 0, fmt.Errorf("%s: chunk at %d: %w", e.Name, c.Offset, err)
			}
		}
		rows += 1 + len(e.Chunks)
	}
	if err := files.flush(ctx); err != nil {
		return 0, err
	}
	return i, chunks.flush(ctx)
}

// batcher accumulates rows and inserts them with multi-row statements. The
// full-size statement is prepared once per transaction.
type batcher struct {
	d       *DB
	tx      *sql.Tx
	prefix  string
	suffix  string // after the rows, e.g. an ON CONFLICT clause
	cols    int
	max     int
	args    []any
	full    *sql.Stmt
	pending int
}

func newBatcher(d *DB, tx *sql.Tx, prefix string, cols, max int) *batcher {
	return &batcher{d: d, tx: tx, prefix: prefix, cols: cols, max: max, args: make([]any, 0, cols*max)}
}

func (b *batcher) statement(rows int) string {
	row := "(" + strings.TrimSuffix(strings.Repeat("?, ", b.cols), ", ") + ")"
	var s strings.Builder
	s.WriteString(b.prefix)
	for i := 0; i < rows; i++ {
		if i > 0 {
			s.WriteString(", ")
		}
		s.WriteString(row)
	}
	s.WriteString(b.suffix)
	return b.d.rebind(s.String())
}

func (b *batcher) add(ctx context.Context, vals ...any) error {
	b.args = append(b.args, vals...)
	b.pending++
	if b.pending < b.max {
		return nil
	}
	if b.full == nil {
		st, err := b.tx.PrepareContext(ctx, b.statement(b.max))
		if err != nil {
			return err
		}
		b.full = st
	}
	_, err := b.full.ExecContext(ctx, b.args...)
	b.args, b.pending = b.args[:0], 0
	return err
}

func (b *batcher) flush(ctx context.Context) error {
	if b.pending == 0 {
		return nil
	}
	_, err := b.tx.ExecContext(ctx, b.statement(b.pending), b.args...)
	b.args, b.pending = b.args[:0], 0
	return err
}

func (b *batcher) close() {
	if b.full != nil {
		b.full.Close()
	}
}

// LayerExists reports whether the layer is indexed.
func (d *DB) LayerExists(ctx context.Context, digest string) (bool, error) {
	var n int
	if err := d.queryRow(ctx, d.db, `SELECT COUNT(*) FROM layers WHERE digest = ?`, digest).Scan(&n); err != nil {
		return false, fmt.Errorf("look up layer %s: %w", digest, err)
	}
	return n > 0, nil
}

// GetLayer returns a stored layer with its entries and chunks, or
// ErrNotFound.
func (d *DB) GetLayer(ctx context.Context, digest string) (*Layer, error) {
	l := &Layer{Digest: digest}
	var files int
	err := d.queryRow(ctx, d.db, `SELECT diff_id, size, toc_digest, uncompressed_size, files
		FROM layers WHERE digest = ?`, digest).Scan(&l.DiffID, &l.Size, &l.TOCDigest, &l.UncompressedSize, &files)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("get layer %s: %w", digest, err)
	}
	if l.Entries, err = d.layerEntries(ctx, d.db, digest, files); err != nil {
		return nil, fmt.Errorf("get layer %s: %w", digest, err)
	}
	return l, nil
}

// ManifestTrees returns the file trees of the layers of a converted
// manifest, base first, each in TOC order (OriginalDigest is left empty:
// see OriginalManifests). It returns ErrNotFound when the manifest is not
// (or not yet) indexed, and an error when one of its layers is not: a
// converted manifest is only recorded once all its layers are stored.
func (d *DB) ManifestTrees(ctx context.Context, manifestDigest string) ([]api.LayerTree, error) {
	type layerRow struct {
		tree  api.LayerTree
		files int // entries, a capacity hint
	}
	rows, err := d.query(ctx, d.db, `
		SELECT ml.position, ml.layer_digest, l.diff_id, l.size, l.files
		FROM manifest_layers ml LEFT JOIN layers l ON l.digest = ml.layer_digest
		WHERE ml.manifest_digest = ?
		ORDER BY ml.position`, manifestDigest)
	if err != nil {
		return nil, fmt.Errorf("listing layers of manifest %s: %w", manifestDigest, err)
	}
	var layers []layerRow
	for rows.Next() {
		var (
			pos    int
			l      layerRow
			diffID sql.NullString
			size   sql.NullInt64
			files  sql.NullInt64
		)
		if err := rows.Scan(&pos, &l.tree.Digest, &diffID, &size, &files); err != nil {
			rows.Close()
			return nil, fmt.Errorf("listing layers of manifest %s: %w", manifestDigest, err)
		}
		if pos != len(layers) {
			rows.Close()
			return nil, fmt.Errorf("index of manifest %s: layer position %d, want %d", manifestDigest, pos, len(layers))
		}
		if !diffID.Valid {
			rows.Close()
			return nil, fmt.Errorf("index of manifest %s: layer %s is not indexed", manifestDigest, l.tree.Digest)
		}
		l.tree.DiffID, l.tree.Size, l.files = diffID.String, size.Int64, int(files.Int64)
		layers = append(layers, l)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("listing layers of manifest %s: %w", manifestDigest, err)
	}
	if len(layers) == 0 {
		// No layer rows: either a manifest without layers or one that is
		// not (yet) converted. Only the latter is unknown to
		// image_manifests.
		var one int
		err := d.queryRow(ctx, d.db, `SELECT 1 FROM image_manifests WHERE manifest_digest = ? LIMIT 1`,
			manifestDigest).Scan(&one)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			return nil, ErrNotFound
		case err != nil:
			return nil, fmt.Errorf("looking up manifest %s: %w", manifestDigest, err)
		}
		return nil, nil
	}
	trees := make([]api.LayerTree, len(layers))
	for i := range layers {
		trees[i] = layers[i].tree
		if trees[i].Entries, err = d.layerEntries(ctx, d.db, trees[i].Digest, layers[i].files); err != nil {
			return nil, err
		}
	}
	return trees, nil
}

// maxParams bounds the parameters of one statement: SQLite's historical
// limit is 999, PostgreSQL's 65535.
const maxParams = 500

// ContentsInLayers returns the digests of contents that some file of
// layers holds, whatever image or repository indexed those layers. Only
// digests in contents are looked for, so the result (and the memory it
// takes) is bounded by contents, not by how many files layers hold.
// Layers that are not indexed hold nothing.
func (d *DB) ContentsInLayers(ctx context.Context, layers []string, contents map[string]struct{}) (map[string]struct{}, error) {
	found := make(map[string]struct{})
	for start := 0; start < len(layers) && len(found) < len(contents); start += maxParams {
		batch := layers[start:min(start+maxParams, len(layers))]
		args := make([]any, len(batch))
		for i, l := range batch {
			args[i] = l
		}
		if err := d.collectContents(ctx, `SELECT DISTINCT digest FROM files WHERE digest <> '' AND layer_digest IN (?`+
			strings.Repeat(",?", len(batch)-1)+`)`, args, contents, found); err != nil {
			return nil, fmt.Errorf("listing contents of %d layers: %w", len(layers), err)
		}
	}
	return found, nil
}

func (d *DB) collectContents(ctx context.Context, query string, args []any, contents, found map[string]struct{}) error {
	rows, err := d.query(ctx, d.db, query, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var c string
		if err := rows.Scan(&c); err != nil {
			return err
		}
		if _, ok := contents[c]; ok {
			found[c] = struct{}{}
		}
	}
	return rows.Err()
}
