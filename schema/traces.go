package schema

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Trace is one accepted startup trace: the first accesses of one container
// run of a converted platform manifest, validated against the index.
type Trace struct {
	ID             string // sha256 of the canonical report
	Repository     string
	ManifestDigest string
	Worker         string
	Container      string
	StartedAt      time.Time
	// Predicted marks a trace the registry predicted at conversion rather
	// than a worker's record of a run. A manifest's priority is merged
	// from its real traces; from its latest prediction while it has none.
	Predicted bool
	// Entries are in order of first access (seq order).
	Entries []TraceEntry
}

// TraceEntry is one first access of a trace.
type TraceEntry struct {
	Layer       string // converted layer digest
	Name        string // entry name in that layer
	Digest      string // content digest from the index; "" for an entry without content
	ChunkOffset int64
	TimeNS      int64
}

// TraceRun is a stored trace as the merge reads it.
type TraceRun struct {
	ID        string
	Worker    string
	Container string
	StartedAt time.Time
	CreatedAt time.Time
	Predicted bool
	Entries   []TraceEntry // seq order
}

// PriorityItem is one item of a manifest's merged priority.
type PriorityItem struct {
	Layer       string
	Name        string
	ChunkOffset int64
	Digest      string
	// Whole is set when a run that recorded whole files (only opens, no
	// chunk offsets) saw the item: the rest of the file should follow it.
	Whole bool
	Runs  int // runs that accessed the item
}

// MergeFunc computes the merged priority of a manifest from its runs,
// most recently stored first: its real runs, or its latest prediction
// alone when it has no real run. It must be deterministic.
type MergeFunc func(runs []TraceRun) []PriorityItem

// Merge bounds: only the most recent runs of a manifest, and the first
// accesses of each, take part in a merge, so one ingestion costs at most
// MaxMergeRuns × MaxMergeEntries rows however many traces accumulate.
const (
	MaxMergeRuns    = 32
	MaxMergeEntries = 1 << 18
)

// Rows per multi-row INSERT of trace rows.
const (
	traceEntryBatch = 200 // 7 columns
	priorityBatch   = 150 // 9 columns
)

// TraceTarget returns the platform of the converted platform manifest
// manifestDigest of repository and when its image was pushed, or
// ErrNotFound when the repository has no such converted manifest.
func (d *DB) TraceTarget(ctx context.Context, repository, manifestDigest string) (platform string, pushedAt time.Time, err error) {
	platform, ms, err := d.traceTarget(ctx, d.db, repository, manifestDigest)
	return platform, fromMillis(ms), err
}

func (d *DB) traceTarget(ctx context.Context, e execer, repository, manifestDigest string) (string, int64, error) {
	var platform string
	var pushed int64
	err := d.queryRow(ctx, e, `SELECT im.platform, COALESCE(MAX(i.created_at), 0)
		FROM image_manifests im JOIN images i ON i.repository = im.repository AND i.digest = im.image_digest
		WHERE im.repository = ? AND im.manifest_digest = ? AND i.state = 'ready'
		GROUP BY im.platform ORDER BY im.platform LIMIT 1`, repository, manifestDigest).Scan(&platform, &pushed)
	if errors.Is(err, sql.ErrNoRows) {
		return "", 0, ErrNotFound
	}
	if err != nil {
		return "", 0, fmt.Errorf("look up converted manifest %s@%s: %w", repository, manifestDigest, err)
	}
	return platform, pushed, nil
}

// TraceExists reports whether the trace id is stored.
func (d *DB) TraceExists(ctx context.Context, id string) (bool, error) {
	var n int
	if err := d.queryRow(ctx, d.db, `SELECT COUNT(*) FROM traces WHERE id = ?`, id).Scan(&n); err != nil {
		return false, fmt.Errorf("look up trace %s: %w", id, err)
	}
	return n > 0, nil
}

// AddTrace stores t and, unless it was stored already (existing), replaces
// the merged priority of its manifest by merge's result over the most
// recent real runs (or, while there is none, over the latest predicted
// one), all in one transaction. Concurrent AddTrace calls for the
// same manifest serialise on its trace_manifests row, so the last merge to
// commit has seen every trace committed before it.
func (d *DB) AddTrace(ctx context.Context, t *Trace, merge MergeFunc) (existing bool, err error) {
	err = d.inTx(ctx, func(tx *sql.Tx) error {
		platform, pushed, err := d.traceTarget(ctx, tx, t.Repository, t.ManifestDigest)
		if err != nil {
			return err
		}
		now := d.nowMillis()
		// Lock (create) the manifest's row before reading its traces.
		if _, err := d.exec(ctx, tx, `INSERT INTO trace_manifests
			(repository, manifest_digest, platform, pushed_at, traces, items, updated_at)
			VALUES (?, ?, ?, ?, 0, 0, ?)
			ON CONFLICT (repository, manifest_digest) DO UPDATE SET
				platform = excluded.platform, pushed_at = excluded.pushed_at`,
			t.Repository, t.ManifestDigest, platform, pushed, now); err != nil {
			return err
		}
		var started int64
		if !t.StartedAt.IsZero() {
			started = t.StartedAt.UnixMilli()
		}
		predicted := 0
		if t.Predicted {
			predicted = 1
		}
		res, err := d.exec(ctx, tx, `INSERT INTO traces
			(id, repository, manifest_digest, worker, created_at, container, started_at, accesses, predicted)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING`,
			t.ID, t.Repository, t.ManifestDigest, t.Worker, now, t.Container, started, len(t.Entries), predicted)
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil {
			return err
		} else if n == 0 {
			existing = true
			return nil
		}
		if err := d.insertTraceEntries(ctx, tx, t); err != nil {
			return err
		}
		runs, fromPrediction, err := d.traceRuns(ctx, tx, t.Repository, t.ManifestDigest)
		if err != nil {
			return err
		}
		items := merge(runs)
		if err := d.replacePriority(ctx, tx, t.Repository, t.ManifestDigest, items); err != nil {
			return err
		}
		predicted = 0
		if fromPrediction {
			predicted = 1
		}
		_, err = d.exec(ctx, tx, `UPDATE trace_manifests SET
			traces = (SELECT COUNT(*) FROM traces WHERE repository = ? AND manifest_digest = ?),
			items = ?, updated_at = ?, predicted = ?
			WHERE repository = ? AND manifest_digest = ?`,
			t.Repository, t.ManifestDigest, len(items), now, predicted, t.Repository, t.ManifestDigest)
		return err
	})
	if err != nil {
		return false, fmt.Errorf("store trace of %s@%s: %w", t.Repository, t.ManifestDigest, err)
	}
	return existing, nil
}

func (d *DB) insertTraceEntries(ctx context.Context, tx *sql.Tx, t *Trace) error {
	b := newBatcher(d, tx, `INSERT INTO trace_entries
		(trace_id, seq, layer_digest, name, digest, chunk_offset, time_ns) VALUES `, 7, traceEntryBatch)
	defer b.close()
	for i, e := range t.Entries {
		if err := b.add(ctx, t.ID, i, e.Layer, e.Name, e.Digest, e.ChunkOffset, e.TimeNS); err != nil {
			return err
		}
	}
	return b.flush(ctx)
}

// traceRuns loads the runs a merge of a manifest takes, each cut to its
// first MaxMergeEntries accesses: its MaxMergeRuns most recent real runs,
// or, when it has none, its most recent prediction (predicted is then
// true).
func (d *DB) traceRuns(ctx context.Context, e execer, repository, manifestDigest string) (_ []TraceRun, predicted bool, _ error) {
	var real int
	if err := d.queryRow(ctx, e, `SELECT COUNT(*) FROM traces
		WHERE repository = ? AND manifest_digest = ? AND predicted = 0`, repository, manifestDigest).Scan(&real); err != nil {
		return nil, false, err
	}
	predicted, limit, flag := real == 0, MaxMergeRuns, 0
	if predicted {
		limit, flag = 1, 1
	}
	runs, err := d.loadRuns(ctx, e, repository, manifestDigest, flag, limit)
	return runs, predicted, err
}

func (d *DB) loadRuns(ctx context.Context, e execer, repository, manifestDigest string, predicted, limit int) ([]TraceRun, error) {
	rows, err := d.query(ctx, e, `SELECT id, worker, container, started_at, created_at FROM traces
		WHERE repository = ? AND manifest_digest = ? AND predicted = ? ORDER BY created_at DESC, id DESC LIMIT ?`,
		repository, manifestDigest, predicted, limit)
	if err != nil {
		return nil, err
	}
	var runs []TraceRun
	byID := map[string]int{}
	for rows.Next() {
		var r TraceRun
		var started, created int64
		if err := rows.Scan(&r.ID, &r.Worker, &r.Container, &started, &created); err != nil {
			rows.Close()
			return nil, err
		}
		r.StartedAt, r.CreatedAt = fromMillis(started), fromMillis(created)
		r.Predicted = predicted != 0
		byID[r.ID] = len(runs)
		runs = append(runs, r)
	}
	rows.Close()
	if err := rows.Err(); err != nil || len(runs) == 0 {
		return runs, err
	}
	args := make([]any, 0, len(runs)+1)
	for _, r := range runs {
		args = append(args, r.ID)
	}
	args = append(args, MaxMergeEntries)
	erows, err := d.query(ctx, e, `SELECT trace_id, layer_digest, name, digest, chunk_offset, time_ns
		FROM trace_entries WHERE trace_id IN (?`+strings.Repeat(",?", len(runs)-1)+`) AND seq < ?
		ORDER BY trace_id, seq`, args...)
	if err != nil {
		return nil, err
	}
	defer erows.Close()
	for erows.Next() {
		var id string
		var te TraceEntry
		if err := erows.Scan(&id, &te.Layer, &te.Name, &te.Digest, &te.ChunkOffset, &te.TimeNS); err != nil {
			return nil, err
		}
		i, ok := byID[id]
		if !ok {
			return nil, fmt.Errorf("entry of unexpected trace %s", id)
		}
		runs[i].Entries = append(runs[i].Entries, te)
	}
	return runs, erows.Err()
}

func (d *DB) replacePriority(ctx context.Context, tx *sql.Tx, repository, manifestDigest string, items []PriorityItem) error {
	if _, err := d.exec(ctx, tx, `DELETE FROM trace_priority WHERE repository = ? AND manifest_digest = ?`,
		repository, manifestDigest); err != nil {
		return err
	}
	b := newBatcher(d, tx, `INSERT INTO trace_priority
		(repository, manifest_digest, position, layer_digest, name, chunk_offset, digest, whole, runs) VALUES `,
		9, priorityBatch)
	defer b.close()
	for i, it := range items {
		whole := 0
		if it.Whole {
			whole = 1
		}
		if err := b.add(ctx, repository, manifestDigest, i, it.Layer, it.Name, it.ChunkOffset, it.Digest, whole, it.Runs); err != nil {
			return err
		}
	}
	return b.flush(ctx)
}

// TracePriority returns the merged priority of a manifest's real traces,
// first item first; empty when it has none.
func (d *DB) TracePriority(ctx context.Context, repository, manifestDigest string) ([]PriorityItem, error) {
	return d.priority(ctx, repository, manifestDigest, 0)
}

// PredictedPriority returns the priority of a manifest's latest predicted
// trace while it has no real trace, first item first; empty otherwise.
func (d *DB) PredictedPriority(ctx context.Context, repository, manifestDigest string) ([]PriorityItem, error) {
	return d.priority(ctx, repository, manifestDigest, 1)
}

func (d *DB) priority(ctx context.Context, repository, manifestDigest string, predicted int) ([]PriorityItem, error) {
	rows, err := d.query(ctx, d.db, `SELECT tp.layer_digest, tp.name, tp.chunk_offset, tp.digest, tp.whole, tp.runs
		FROM trace_priority tp JOIN trace_manifests tm
		  ON tm.repository = tp.repository AND tm.manifest_digest = tp.manifest_digest
		WHERE tp.repository = ? AND tp.manifest_digest = ? AND tm.predicted = ? ORDER BY tp.position`,
		repository, manifestDigest, predicted)
	if err != nil {
		return nil, fmt.Errorf("priority of %s@%s: %w", repository, manifestDigest, err)
	}
	defer rows.Close()
	var out []PriorityItem
	for rows.Next() {
		var it PriorityItem
		var whole int
		if err := rows.Scan(&it.Layer, &it.Name, &it.ChunkOffset, &it.Digest, &whole, &it.Runs); err != nil {
			return nil, err
		}
		it.Whole = whole != 0
		out = append(out, it)
	}
	return out, rows.Err()
}

// TraceCount returns how many traces of a manifest are stored, predicted
// ones included.
func (d *DB) TraceCount(ctx context.Context, repository, manifestDigest string) (int, error) {
	var n int
	err := d.queryRow(ctx, d.db, `SELECT COUNT(*) FROM traces WHERE repository = ? AND manifest_digest = ?`,
		repository, manifestDigest).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("count traces of %s@%s: %w", repository, manifestDigest, err)
	}
	return n, nil
}

// TraceTotals counts the merged priorities of the whole index, predicted
// ones included.
type TraceTotals struct {
	Manifests int64 // traced manifests
	Traces    int64 // traces merged into them
	Items     int64 // items of their merged priorities
}

// TraceTotals returns the counts over every traced manifest. Traces are
// only ever added, so the totals change with every merge: a reader may
// use them to tell whether priorities it keeps in memory are stale.
func (d *DB) TraceTotals(ctx context.Context) (TraceTotals, error) {
	var t TraceTotals
	err := d.queryRow(ctx, d.db, `SELECT COUNT(*), COALESCE(SUM(traces), 0), COALESCE(SUM(items), 0)
		FROM trace_manifests`).Scan(&t.Manifests, &t.Traces, &t.Items)
	if err != nil {
		return TraceTotals{}, fmt.Errorf("counting traces: %w", err)
	}
	return t, nil
}

// PreviousTracedManifest returns the traced manifest of repository, other
// than manifestDigest and with its platform, whose image was pushed last
// (ties: merged last, then digest order), or "" when there is none. A new
// version of an image inherits its priority until it is traced itself.
// Only real traces count: a predicted priority is not inherited.
func (d *DB) PreviousTracedManifest(ctx context.Context, repository, manifestDigest string) (string, error) {
	var prev string
	err := d.queryRow(ctx, d.db, `SELECT tm.manifest_digest FROM trace_manifests tm
		WHERE tm.repository = ? AND tm.manifest_digest <> ? AND tm.items > 0 AND tm.predicted = 0
		  AND tm.platform IN (SELECT platform FROM image_manifests WHERE repository = ? AND manifest_digest = ?)
		ORDER BY tm.pushed_at DESC, tm.updated_at DESC, tm.manifest_digest LIMIT 1`,
		repository, manifestDigest, repository, manifestDigest).Scan(&prev)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return "", nil
	case err != nil:
		return "", fmt.Errorf("looking up the previous traced version of %s@%s: %w", repository, manifestDigest, err)
	}
	return prev, nil
}

// TracedChunk is one item of some manifest's merged priority, with its
// place in it.
type TracedChunk struct {
	Digest      string // content
	ChunkOffset int64
	Whole       bool
	Position    int64 // in its manifest's priority, 0 first
	Items       int64 // length of that priority
}

// AllTracedChunks calls fn with every item of every merged priority of
// real traces, in no particular order. fn must not use the DB.
func (d *DB) AllTracedChunks(ctx context.Context, fn func(TracedChunk)) error {
	err := d.eachTracedChunk(ctx, fn, `SELECT tp.digest, tp.chunk_offset, tp.whole, tp.position, tm.items
		FROM trace_priority tp JOIN trace_manifests tm
		  ON tm.repository = tp.repository AND tm.manifest_digest = tp.manifest_digest
		WHERE tm.predicted = 0`)
	if err != nil {
		return fmt.Errorf("reading every merged priority: %w", err)
	}
	return nil
}

// TracedChunksOf calls fn, in no particular order, with the items of any
// merged priority of real traces (of any repository) whose content some
// layer of the converted manifest manifestDigest holds. An item several
// files of the manifest hold is passed once. fn must not use the DB.
func (d *DB) TracedChunksOf(ctx context.Context, manifestDigest string, fn func(TracedChunk)) error {
	err := d.eachTracedChunk(ctx, fn, `SELECT DISTINCT tp.digest, tp.chunk_offset, tp.whole, tp.position, tm.items
		FROM manifest_layers ml
		JOIN files f ON f.layer_digest = ml.layer_digest
		JOIN trace_priority tp ON tp.digest = f.digest
		JOIN trace_manifests tm ON tm.repository = tp.repository AND tm.manifest_digest = tp.manifest_digest
		WHERE ml.manifest_digest = ? AND f.digest <> '' AND tm.predicted = 0`, manifestDigest)
	if err != nil {
		return fmt.Errorf("reading the priorities of the contents of %s: %w", manifestDigest, err)
	}
	return nil
}

func (d *DB) eachTracedChunk(ctx context.Context, fn func(TracedChunk), query string, args ...any) error {
	rows, err := d.query(ctx, d.db, query, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var c TracedChunk
		var whole int
		if err := rows.Scan(&c.Digest, &c.ChunkOffset, &whole, &c.Position, &c.Items); err != nil {
			return err
		}
		c.Whole = whole != 0
		fn(c)
	}
	return rows.Err()
}
