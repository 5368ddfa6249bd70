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

// PutLayer stores a layer with all its files and chunks in one
// transaction. Storing a layer that already exists is a no-op: a layer's
// digest covers its content, so the stored rows are already right.
func (d *DB) PutLayer(ctx context.Context, l *Layer) error {
	err := d.inTx(ctx, func(tx *sql.Tx) error {
		// ON CONFLICT DO NOTHING also makes a concurrent insert by another
		// replica wait for that one's commit, then skip.
		res, err := d.exec(ctx, tx, `INSERT INTO layers
			(digest, diff_id, size, toc_digest, uncompressed_size, files, created_at)
			VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING`,
			l.Digest, l.DiffID, l.Size, l.TOCDigest, l.UncompressedSize, len(l.Entries), d.nowMillis())
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil || n == 0 {
			return err
		}
		return d.insertFiles(ctx, tx, l)
	})
	if err != nil {
		return fmt.Errorf("store layer %s: %w", l.Digest, err)
	}
	return nil
}

func (d *DB) insertFiles(ctx context.Context, tx *sql.Tx, l *Layer) error {
	const fileCols = `(layer_digest, position, ` + fileColumns + `)`
	const chunkCols = `(layer_digest, file_position, chunk_offset, chunk_size, chunk_digest,
		compressed_offset, compressed_size)`
	files := newBatcher(d, tx, "INSERT INTO files "+fileCols+" VALUES ", 14, fileBatch)
	chunks := newBatcher(d, tx, "INSERT INTO chunks "+chunkCols+" VALUES ", 7, chunkBatch)
	defer files.close()
	defer chunks.close()
	row := make([]any, 0, 14) // reused: add copies the values
	for i := range l.Entries {
		e := &l.Entries[i]
		var err error
		if row, err = appendFileRow(append(row[:0], l.Digest, i), e); err != nil {
			return err
		}
		if err := files.add(ctx, row...); err != nil {
			return fmt.Errorf("%s: %w", e.Name, err)
		}
		for _, c := range e.Chunks {
			if err := chunks.add(ctx, l.Digest, i, c.Offset, c.Size, c.Digest,
				c.CompressedOffset, c.CompressedSize); err != nil {
				return fmt.Errorf("%s: chunk at %d: %w", e.Name, c.Offset, err)
			}
		}
	}
	if err := files.flush(ctx); err != nil {
		return err
	}
	return chunks.flush(ctx)
}

// batcher accumulates rows and inserts them with multi-row statements. The
// full-size statement is prepared once per transaction.
type batcher struct {
	d       *DB
	tx      *sql.Tx
	prefix  string
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
	return b.d.Rebind(s.String())
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
