// Package schema owns Starlight's index database: the versioned SQL
// migrations (embedded, applied with goose when the database is opened) and
// the typed queries the registry runs against it. Every SQL statement on
// the index is in this package, one file per concept (images, jobs,
// layers and their entries, traces); other packages, the delta planner
// included, call methods of DB and never see SQL.
//
// The same SQL runs on SQLite (the embedded default, one registry) and on
// PostgreSQL (a fleet of registry replicas sharing one index). Queries are
// written with "?" placeholders and rebound to "$n" for PostgreSQL.
package schema

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
	_ "github.com/mattn/go-sqlite3"    // registers the "sqlite3" driver
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"
)

//go:embed migrations/*.sql
var embedded embed.FS

// ErrNotFound is returned by lookups that match no row.
var ErrNotFound = errors.New("not found")

// Dialects, as returned by (*DB).Dialect.
const (
	DialectSQLite   = "sqlite"
	DialectPostgres = "postgres"
)

// DB is an open, migrated index database.
type DB struct {
	db      *sql.DB
	dialect string
	// now is the clock used for every timestamp; tests replace it.
	now func() time.Time
	// afterIndexBatch, if set, is called by PutLayer after each committed
	// batch with the number of entries stored so far (tests).
	afterIndexBatch func(stored int)
}

// Open connects to the index database named by dsn and applies pending
// migrations. dsn is "postgres://..." (or "postgresql://...") for
// PostgreSQL; "sqlite://PATH" or a bare PATH for SQLite, whose parent
// directory is created if needed.
func Open(ctx context.Context, dsn string) (*DB, error) {
	d, err := open(dsn)
	if err != nil {
		return nil, err
	}
	if err := d.migrate(ctx, 0); err != nil {
		d.db.Close()
		return nil, err
	}
	return d, nil
}

// open connects without migrating.
func open(dsn string) (*DB, error) {
	if dsn == "" {
		return nil, errors.New("open index database: empty DSN")
	}
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		db, err := sql.Open("pgx", dsn)
		if err != nil {
			return nil, fmt.Errorf("open index database: %w", err)
		}
		return &DB{db: db, dialect: DialectPostgres, now: time.Now}, nil
	}
	path := strings.TrimPrefix(dsn, "sqlite://")
	if strings.ContainsAny(path, "?#") {
		return nil, fmt.Errorf("open index database: SQLite path %q must not contain '?' or '#'", path)
	}
	if dir := filepath.Dir(path); dir != "" {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return nil, fmt.Errorf("open index database: %w", err)
		}
	}
	// WAL lets readers (status API, delta planner) run beside the single
	// writer; busy_timeout makes writers queue instead of failing; BEGIN
	// IMMEDIATE takes the write lock up front so read-then-write
	// transactions cannot deadlock on a lock upgrade.
	params := url.Values{}
	params.Set("_journal_mode", "WAL")
	params.Set("_busy_timeout", "10000")
	params.Set("_foreign_keys", "on")
	params.Set("_txlock", "immediate")
	params.Set("_synchronous", "NORMAL")
	db, err := sql.Open("sqlite3", path+"?"+params.Encode())
	if err != nil {
		return nil, fmt.Errorf("open index database %s: %w", path, err)
	}
	db.SetMaxOpenConns(16)
	return &DB{db: db, dialect: DialectSQLite, now: time.Now}, nil
}

// provider returns a goose provider over the embedded migrations.
func (d *DB) provider() (*goose.Provider, error) {
	fsys, err := fs.Sub(embedded, "migrations")
	if err != nil {
		return nil, err
	}
	dialect := goose.DialectSQLite3
	var opts []goose.ProviderOption
	if d.dialect == DialectPostgres {
		dialect = goose.DialectPostgres
		// Replicas starting together must not migrate concurrently.
		locker, err := lock.NewPostgresSessionLocker()
		if err != nil {
			return nil, err
		}
		opts = append(opts, goose.WithSessionLocker(locker))
	}
	return goose.NewProvider(dialect, d.db, fsys, opts...)
}

// migrate applies migrations up to version, or all of them when version is 0.
func (d *DB) migrate(ctx context.Context, version int64) error {
	p, err := d.provider()
	if err != nil {
		return fmt.Errorf("migrate index database: %w", err)
	}
	if version == 0 {
		_, err = p.Up(ctx)
	} else {
		_, err = p.UpTo(ctx, version)
	}
	if err != nil {
		return fmt.Errorf("migrate index database: %w", err)
	}
	return nil
}

// Version returns the schema version of the database.
func (d *DB) Version(ctx context.Context) (int64, error) {
	p, err := d.provider()
	if err != nil {
		return 0, err
	}
	return p.GetDBVersion(ctx)
}

// Close closes the database.
func (d *DB) Close() error { return d.db.Close() }

// Dialect returns DialectSQLite or DialectPostgres.
func (d *DB) Dialect() string { return d.dialect }

// rebind rewrites the "?" placeholders of query for the database's driver:
// "$1", "$2", ... for PostgreSQL, unchanged for SQLite. Question marks
// inside single-quoted literals are left alone. Every statement goes
// through it (exec, query, queryRow, batcher): the SQL lives in this
// package only, so no other package needs to know the dialect.
func (d *DB) rebind(query string) string {
	if d.dialect != DialectPostgres {
		return query
	}
	return rebindDollar(query)
}

func rebindDollar(query string) string {
	var b strings.Builder
	b.Grow(len(query) + 8)
	n := 0
	inQuote := false
	for i := 0; i < len(query); i++ {
		c := query[i]
		switch {
		case c == '\'':
			inQuote = !inQuote
			b.WriteByte(c)
		case c == '?' && !inQuote:
			n++
			fmt.Fprintf(&b, "$%d", n)
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// execer is what *sql.DB and *sql.Tx have in common.
type execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

func (d *DB) exec(ctx context.Context, e execer, query string, args ...any) (sql.Result, error) {
	return e.ExecContext(ctx, d.rebind(query), args...)
}

func (d *DB) query(ctx context.Context, e execer, query string, args ...any) (*sql.Rows, error) {
	return e.QueryContext(ctx, d.rebind(query), args...)
}

func (d *DB) queryRow(ctx context.Context, e execer, query string, args ...any) *sql.Row {
	return e.QueryRowContext(ctx, d.rebind(query), args...)
}

// inTx runs fn in a transaction, committing when it returns nil.
func (d *DB) inTx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback() //nolint:errcheck // the original error matters
		return err
	}
	return tx.Commit()
}

func (d *DB) nowMillis() int64 { return d.now().UnixMilli() }

func fromMillis(ms int64) time.Time {
	if ms == 0 {
		return time.Time{}
	}
	return time.UnixMilli(ms).UTC()
}
