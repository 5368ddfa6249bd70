package schema

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/starlight-project/starlight/api"
)

// testDSN returns a fresh, empty database: a new database on the
// PostgreSQL server STARLIGHT_TEST_POSTGRES names (a DSN whose user may
// create databases), SQLite in a temporary directory otherwise.
func testDSN(t *testing.T) string {
	t.Helper()
	admin := os.Getenv("STARLIGHT_TEST_POSTGRES")
	if admin == "" {
		return "sqlite://" + filepath.Join(t.TempDir(), "index.db")
	}
	db, err := sql.Open("pgx", admin)
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("starlight_test_%d", time.Now().UnixNano())
	if _, err := db.Exec("CREATE DATABASE " + name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		db.Exec("DROP DATABASE " + name + " WITH (FORCE)")
		db.Close()
	})
	u, err := url.Parse(admin)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	return u.String()
}

func openTest(t *testing.T) *DB {
	t.Helper()
	db, err := Open(context.Background(), testDSN(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// fakeClock is a settable clock for lease and backoff tests.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func latestVersion(t *testing.T) int64 {
	t.Helper()
	files, err := filepath.Glob("migrations/*.sql")
	if err != nil || len(files) == 0 {
		t.Fatalf("no migrations: %v", err)
	}
	return int64(len(files))
}

func TestOpenFreshAndReopen(t *testing.T) {
	if os.Getenv("STARLIGHT_TEST_POSTGRES") != "" {
		t.Skip("SQLite only")
	}
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "sub", "dir", "index.db")
	for _, dsn := range []string{path, "sqlite://" + path} {
		db, err := Open(ctx, dsn)
		if err != nil {
			t.Fatalf("open %s: %v", dsn, err)
		}
		v, err := db.Version(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if want := latestVersion(t); v != want {
			t.Errorf("version = %d, want %d", v, want)
		}
		var mode string
		if err := db.db.QueryRow("PRAGMA journal_mode").Scan(&mode); err != nil || mode != "wal" {
			t.Errorf("journal_mode = %q (%v), want wal", mode, err)
		}
		if _, err := db.Enqueue(ctx, Push{Repository: "library/a", Digest: "sha256:aa", MediaType: "m", Tag: "v1"}); err != nil {
			t.Fatal(err)
		}
		db.Close()
	}
	// Both DSN spellings opened the same file: the job survived.
	db, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Job(ctx, "library/a", "sha256:aa", "v1"); err != nil {
		t.Fatalf("job after reopen: %v", err)
	}
}

func TestUpgradeFromVersion1(t *testing.T) {
	ctx := context.Background()
	dsn := testDSN(t)
	old, err := open(dsn)
	if err != nil {
		t.Fatal(err)
	}
	if err := old.migrate(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if v, _ := old.Version(ctx); v != 1 {
		t.Fatalf("version = %d, want 1", v)
	}
	// A version 1 registry queued a job and started it.
	if _, err := old.db.Exec(old.rebind(`INSERT INTO jobs (repository, digest, tag, state, attempts, lease_until, created_at, updated_at)
		VALUES (?, ?, ?, 'converting', 1, 5, 1, 1)`), "library/old", "sha256:01", "v1"); err != nil {
		t.Fatal(err)
	}
	old.Close()

	db, err := Open(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if v, _ := db.Version(ctx); v != latestVersion(t) {
		t.Fatalf("version after upgrade = %d", v)
	}
	// The old job's lease expired long ago: the upgraded registry retakes it.
	j, err := db.LeaseJob(ctx, "new", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if j.Digest != "sha256:01" || j.Owner != "new" || j.Attempts != 2 {
		t.Errorf("leased %+v", j)
	}
}

func TestRebind(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"SELECT 1", "SELECT 1"},
		{"a = ? AND b = ?", "a = $1 AND b = $2"},
		{"a = '?' AND b = ?", "a = '?' AND b = $1"},
	} {
		if got := rebindDollar(tc.in); got != tc.want {
			t.Errorf("rebind(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	db := &DB{dialect: DialectSQLite}
	if got := db.rebind("a = ?"); got != "a = ?" {
		t.Errorf("sqlite rebind changed the query: %q", got)
	}
}

func TestJobLeasing(t *testing.T) {
	ctx := context.Background()
	db := openTest(t)
	clock := &fakeClock{t: time.Unix(1_700_000_000, 0)}
	db.now = clock.now

	if _, err := db.LeaseJob(ctx, "a", time.Minute); !errors.Is(err, ErrNotFound) {
		t.Fatalf("lease on empty queue: %v", err)
	}
	push := func(tag string, requeue bool) bool {
		t.Helper()
		queued, err := db.Enqueue(ctx, Push{Repository: "r", Digest: "sha256:01", MediaType: "m", Tag: tag, Requeue: requeue})
		if err != nil {
			t.Fatal(err)
		}
		return queued
	}
	if !push("v1", true) {
		t.Fatal("first push not queued")
	}
	// The same push again while queued changes nothing.
	if push("v1", true) {
		t.Error("duplicate push queued a second job")
	}
	// Another tag of the same image is a job of its own, but it is not
	// leased while the first one converts the image.
	clock.add(time.Millisecond)
	push("v2", true)

	j, err := db.LeaseJob(ctx, "a", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if j.Tag != "v1" || j.State != "converting" || j.Attempts != 1 {
		t.Fatalf("leased %+v", j)
	}
	if _, err := db.LeaseJob(ctx, "b", time.Minute); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second lease while the image converts: %v", err)
	}

	// Process a dies; after its lease expires b retakes the job.
	clock.add(2 * time.Minute)
	j2, err := db.LeaseJob(ctx, "b", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if j2.Tag != "v1" || j2.Owner != "b" || j2.Attempts != 2 {
		t.Fatalf("retaken %+v", j2)
	}
	// a wakes up: it cannot complete a job it lost.
	if err := db.CompleteJob(ctx, j); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("complete by stale owner: %v", err)
	}
	if err := db.RenewLease(ctx, j2, time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := db.CompleteJob(ctx, j2); err != nil {
		t.Fatal(err)
	}

	// Now v2 runs; it fails and is retried after a backoff, then fails for good.
	j3, err := db.LeaseJob(ctx, "b", time.Minute)
	if err != nil || j3.Tag != "v2" {
		t.Fatalf("lease v2: %+v %v", j3, err)
	}
	final, err := db.FailJob(ctx, j3, "boom", 2, 10*time.Second)
	if err != nil || final {
		t.Fatalf("first failure: final=%v %v", final, err)
	}
	if _, err := db.LeaseJob(ctx, "b", time.Minute); !errors.Is(err, ErrNotFound) {
		t.Fatalf("lease during backoff: %v", err)
	}
	clock.add(11 * time.Second)
	j4, err := db.LeaseJob(ctx, "b", time.Minute)
	if err != nil || j4.Attempts != 2 {
		t.Fatalf("lease after backoff: %+v %v", j4, err)
	}
	final, err = db.FailJob(ctx, j4, "boom again", 2, 10*time.Second)
	if err != nil || !final {
		t.Fatalf("last failure: final=%v %v", final, err)
	}
	got, err := db.Job(ctx, "r", "sha256:01", "v2")
	if err != nil || got.State != "failed" || got.Error != "boom again" {
		t.Fatalf("failed job: %+v %v", got, err)
	}
	failed, err := db.Jobs(ctx, 10, "failed")
	if err != nil || len(failed) != 1 {
		t.Fatalf("failed jobs: %v %v", failed, err)
	}
	// Tagging again without a push leaves a failed job alone; pushing
	// again retries it.
	if push("v2", false) {
		t.Error("retag requeued a finished job")
	}
	if !push("v2", true) {
		t.Error("push after failure did not queue a retry")
	}
	if q, r, err := db.QueueDepth(ctx); err != nil || q != 1 || r != 0 {
		t.Errorf("queue depth = %d, %d, %v", q, r, err)
	}

	// A released job is not charged an attempt.
	j5, err := db.LeaseJob(ctx, "c", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.ReleaseJob(ctx, j5); err != nil {
		t.Fatal(err)
	}
	got, _ = db.Job(ctx, "r", "sha256:01", "v2")
	if got.State != "queued" || got.Attempts != 0 {
		t.Errorf("released job: %+v", got)
	}
}

func testLayer(dgst string) *Layer {
	mtime := time.Unix(1_600_000_000, 123).UTC()
	l := &Layer{Digest: dgst, DiffID: "sha256:d1ff", Size: 1234, TOCDigest: "sha256:70c", UncompressedSize: 4096}
	l.Entries = append(l.Entries,
		api.Entry{Name: "etc", Type: api.TypeDir, Mode: 0o755, ModTime: mtime},
		api.Entry{Name: "etc/passwd", Type: api.TypeReg, Mode: 0o644, Size: 3, ModTime: mtime,
			Digest: "sha256:aaaa", Xattrs: map[string][]byte{"user.k": {0, 1, 2}},
			Chunks: []api.Chunk{{Offset: 0, Size: 3, Digest: "sha256:aaaa", CompressedOffset: 10, CompressedSize: 30}}},
		api.Entry{Name: "bin/sh", Type: api.TypeSymlink, Mode: 0o777, LinkName: "busybox", ModTime: mtime},
		api.Entry{Name: "dev/null", Type: api.TypeChar, Mode: 0o666, DevMajor: 1, DevMinor: 3, ModTime: mtime},
		// No mtime in the TOC: convert.ReadIndex says the epoch.
		api.Entry{Name: "empty", Type: api.TypeReg, Mode: 0o4755, UID: 1000, GID: 1000, ModTime: time.Unix(0, 0).UTC()},
	)
	// Enough files and chunks to need several batches.
	for i := 0; i < 450; i++ {
		name := "big/" + string(rune('a'+i%26)) + "/" + time.Duration(i).String()
		e := api.Entry{Name: name, Type: api.TypeReg, Mode: 0o600, Size: 2, ModTime: mtime, Digest: "sha256:bb"}
		e.Chunks = []api.Chunk{
			{Offset: 0, Size: 1, Digest: "sha256:c0", CompressedOffset: int64(100 + 2*i), CompressedSize: 1},
			{Offset: 1, Size: 1, Digest: "sha256:c1", CompressedOffset: int64(101 + 2*i), CompressedSize: 1},
		}
		l.Entries = append(l.Entries, e)
	}
	return l
}

func TestPutLayerRoundTripAndIdempotent(t *testing.T) {
	ctx := context.Background()
	db := openTest(t)
	l := testLayer("sha256:1a")
	if err := db.PutLayer(ctx, l); err != nil {
		t.Fatal(err)
	}
	// Storing it again, even with a different (wrong) tree, keeps the first.
	again := testLayer("sha256:1a")
	again.Entries = again.Entries[:1]
	if err := db.PutLayer(ctx, again); err != nil {
		t.Fatalf("second insert: %v", err)
	}
	got, err := db.GetLayer(ctx, "sha256:1a")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, l) {
		t.Errorf("layer round trip differs:\n got %+v\nwant %+v", got.Entries[:5], l.Entries[:5])
	}
	if _, err := db.GetLayer(ctx, "sha256:none"); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing layer: %v", err)
	}
}

func TestImageLifecycle(t *testing.T) {
	ctx := context.Background()
	db := openTest(t)
	if _, err := db.Image(ctx, "r", "sha256:01"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown image: %v", err)
	}
	if _, err := db.Enqueue(ctx, Push{Repository: "r", Digest: "sha256:01", MediaType: "application/vnd.oci.image.manifest.v1+json", Tag: "v1"}); err != nil {
		t.Fatal(err)
	}
	im, err := db.Image(ctx, "r", "sha256:01")
	if err != nil || im.State != api.StateQueued {
		t.Fatalf("queued image: %+v %v", im, err)
	}
	if err := db.SetImageState(ctx, "r", "sha256:01", api.StateConverting, "", 1); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"sha256:l1", "sha256:l2"} {
		if err := db.PutLayer(ctx, testLayer(d)); err != nil {
			t.Fatal(err)
		}
	}
	ms := []ImageManifest{{Platform: "linux/amd64", OriginalDigest: "sha256:01", ManifestDigest: "sha256:c1",
		ConfigDigest: "sha256:cf", Layers: []string{"sha256:l1", "sha256:l2"}}}
	if err := db.CompleteImage(ctx, "r", "sha256:01", "sha256:c1", "application/vnd.oci.image.manifest.v1+json", ms); err != nil {
		t.Fatal(err)
	}
	im, _ = db.Image(ctx, "r", "sha256:01")
	if im.State != api.StateReady || im.ConvertedDigest != "sha256:c1" {
		t.Errorf("ready image: %+v", im)
	}
	got, err := db.ImageManifests(ctx, "r", "sha256:01")
	if err != nil || !reflect.DeepEqual(got, ms) {
		t.Errorf("image manifests = %+v, %v", got, err)
	}
	layers, files, err := db.ImageCounts(ctx, "r", "sha256:01")
	if want := 2 * len(testLayer("x").Entries); err != nil || layers != 2 || files != want {
		t.Errorf("counts = %d layers, %d files, %v; want 2, %d", layers, files, err, want)
	}
	if by, err := db.ImageByConverted(ctx, "r", "sha256:c1"); err != nil || by.Digest != "sha256:01" {
		t.Errorf("by converted: %+v %v", by, err)
	}
	for _, tc := range []struct {
		digest string
		want   bool
	}{{"sha256:c1", true}, {"sha256:01", false}, {"sha256:other", false}} {
		if got, err := db.IsConversionOutput(ctx, "r", tc.digest); err != nil || got != tc.want {
			t.Errorf("IsConversionOutput(%s) = %v, %v", tc.digest, got, err)
		}
	}
	imgDigest, m, err := db.FindImageManifest(ctx, "r", "sha256:c1")
	if err != nil || imgDigest != "sha256:01" || m.Platform != "linux/amd64" {
		t.Errorf("find image manifest: %s %+v %v", imgDigest, m, err)
	}
	// Completing again (a retag) replaces the manifests without duplicates.
	if err := db.CompleteImage(ctx, "r", "sha256:01", "sha256:c1", "application/vnd.oci.image.manifest.v1+json", ms); err != nil {
		t.Fatal(err)
	}
	if layers, _, _ := db.ImageCounts(ctx, "r", "sha256:01"); layers != 2 {
		t.Errorf("layers after second completion = %d", layers)
	}
	// A failing tag-only job does not undo a finished conversion.
	if err := db.SetImageState(ctx, "r", "sha256:01", api.StateFailed, "tagging failed", 1); err != nil {
		t.Fatal(err)
	}
	if im, _ := db.Image(ctx, "r", "sha256:01"); im.State != api.StateReady || im.Error != "" {
		t.Errorf("ready image changed: %+v", im)
	}
}
