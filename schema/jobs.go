package schema

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// ErrLeaseLost is returned when a job is renewed, completed or failed by a
// process that no longer holds its lease (it expired and another process
// retook the job).
var ErrLeaseLost = errors.New("job lease lost")

// Job states are the image states: queued, converting (leased), ready,
// failed.
const (
	jobQueued = "queued"
	jobReady  = "ready"
	jobFailed = "failed"
)

// maxBackoff caps the delay between two attempts of a job.
const maxBackoff = time.Hour

// Job is one durable conversion request: an image pushed to a repository,
// under a tag ("" for a push by digest).
type Job struct {
	Repository string
	Digest     string
	Tag        string
	State      string
	Attempts   int // attempts started, including the running one
	Error      string
	NotBefore  time.Time // earliest next attempt of a queued job
	LeaseUntil time.Time // lease of a converting job
	Owner      string    // process holding the lease
	CreatedAt  time.Time
	UpdatedAt  time.Time
}

func (j *Job) String() string {
	if j.Tag == "" {
		return j.Repository + "@" + j.Digest
	}
	return j.Repository + ":" + j.Tag + "@" + j.Digest
}

const jobColumns = `repository, digest, tag, state, attempts, error, not_before, lease_until,
	owner, created_at, updated_at`

func scanJob(row interface{ Scan(...any) error }) (*Job, error) {
	var j Job
	var notBefore, lease, created, updated int64
	err := row.Scan(&j.Repository, &j.Digest, &j.Tag, &j.State, &j.Attempts, &j.Error,
		&notBefore, &lease, &j.Owner, &created, &updated)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	j.NotBefore, j.LeaseUntil = fromMillis(notBefore), fromMillis(lease)
	j.CreatedAt, j.UpdatedAt = fromMillis(created), fromMillis(updated)
	return &j, nil
}

// Push describes a push to record with Enqueue.
type Push struct {
	Repository string
	Digest     string
	MediaType  string
	Tag        string        // "" for a push by digest
	Delay      time.Duration // the job is not run before this has passed
	// Requeue queues a job that already finished (ready or failed) again,
	// so pushing again retries a failure and rewrites a converted tag.
	// Without it an existing job is left alone.
	Requeue bool
}

// Enqueue records a push durably: the image (queued when it is new, or
// failed and p.Requeue is set) and a conversion job for (repository,
// digest, tag). A job still queued or running is left alone. It reports
// whether a job was queued.
func (d *DB) Enqueue(ctx context.Context, p Push) (bool, error) {
	var queued bool
	imageConflict, jobConflict := `DO NOTHING`, `DO NOTHING`
	if p.Requeue {
		imageConflict = `DO UPDATE SET
				state = 'queued', error = '', attempts = 0, updated_at = excluded.updated_at
			WHERE images.state = 'failed'`
		jobConflict = `DO UPDATE SET
				state = 'queued', attempts = 0, error = '', not_before = excluded.not_before,
				lease_until = 0, owner = '', updated_at = excluded.updated_at
			WHERE jobs.state IN ('ready', 'failed')`
	}
	err := d.inTx(ctx, func(tx *sql.Tx) error {
		now := d.nowMillis()
		if _, err := d.exec(ctx, tx, `INSERT INTO images
			(repository, digest, media_type, state, created_at, updated_at)
			VALUES (?, ?, ?, 'queued', ?, ?)
			ON CONFLICT (repository, digest) `+imageConflict,
			p.Repository, p.Digest, p.MediaType, now, now); err != nil {
			return err
		}
		res, err := d.exec(ctx, tx, `INSERT INTO jobs
			(repository, digest, tag, state, not_before, created_at, updated_at)
			VALUES (?, ?, ?, 'queued', ?, ?, ?)
			ON CONFLICT (repository, digest, tag) `+jobConflict,
			p.Repository, p.Digest, p.Tag, now+p.Delay.Milliseconds(), now, now)
		if err != nil {
			return err
		}
		n, err := res.RowsAffected()
		queued = n > 0
		return err
	})
	if err != nil {
		return false, fmt.Errorf("enqueue %s@%s: %w", p.Repository, p.Digest, err)
	}
	return queued, nil
}

// LeaseJob takes the oldest runnable job for owner until now+lease: a
// queued job whose backoff has passed, or a converting job whose lease
// expired (its process stopped). A job is not taken while another job of
// the same image runs, so one image is never converted twice at once, nor
// while another job of the same tag runs, so the converted tag follows the
// order of pushes. It counts an attempt and returns ErrNotFound when
// nothing is runnable.
func (d *DB) LeaseJob(ctx context.Context, owner string, lease time.Duration) (*Job, error) {
	const runnable = `((state = 'queued' AND not_before <= ?) OR (state = 'converting' AND lease_until < ?))`
	for range 8 {
		var job *Job
		err := d.inTx(ctx, func(tx *sql.Tx) error {
			if err := d.lockLeases(ctx, tx); err != nil {
				return err
			}
			now := d.nowMillis()
			var repo, dgst, tag string
			err := d.queryRow(ctx, tx, `SELECT repository, digest, tag FROM jobs j WHERE `+runnable+`
				AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.repository = j.repository AND o.digest = j.digest
					AND o.state = 'converting' AND o.lease_until >= ?)
				AND (j.tag = '' OR NOT EXISTS (SELECT 1 FROM jobs o WHERE o.repository = j.repository
					AND o.tag = j.tag AND o.state = 'converting' AND o.lease_until >= ?))
				ORDER BY created_at, repository, digest, tag LIMIT 1`, now, now, now, now).Scan(&repo, &dgst, &tag)
			if err != nil {
				return err
			}
			// The WHERE re-checks the row in case it was taken since the
			// SELECT all the same; the loop then tries again.
			res, err := d.exec(ctx, tx, `UPDATE jobs SET state = 'converting', owner = ?, lease_until = ?,
				attempts = attempts + 1, updated_at = ?
				WHERE repository = ? AND digest = ? AND tag = ? AND `+runnable,
				owner, now+lease.Milliseconds(), now, repo, dgst, tag, now, now)
			if err != nil {
				return err
			}
			if n, _ := res.RowsAffected(); n == 0 {
				return nil
			}
			job, err = scanJob(d.queryRow(ctx, tx, `SELECT `+jobColumns+` FROM jobs
				WHERE repository = ? AND digest = ? AND tag = ?`, repo, dgst, tag))
			return err
		})
		if errors.Is(err, sql.ErrNoRows) {
			return nil, ErrNotFound
		}
		if err != nil {
			return nil, fmt.Errorf("lease job: %w", err)
		}
		if job != nil {
			return job, nil
		}
	}
	return nil, ErrNotFound
}

// leaseLockKey names the PostgreSQL advisory lock that serialises
// LeaseJob transactions ("Starligh").
const leaseLockKey int64 = 0x537461726c696768

// lockLeases makes concurrent LeaseJob transactions of every replica take
// turns on PostgreSQL. Under READ COMMITTED the UPDATE re-checks only the
// row it takes, not the other jobs of the same image or tag, so two
// replicas leasing two jobs of one image (a push under two tags) at the
// same moment would both see the other not yet converting and convert
// the image twice at once. Behind the lock each SELECT sees every lease
// committed before it. SQLite needs nothing: BEGIN IMMEDIATE already
// serialises writers.
func (d *DB) lockLeases(ctx context.Context, tx *sql.Tx) error {
	if d.dialect != DialectPostgres {
		return nil
	}
	_, err := d.exec(ctx, tx, `SELECT pg_advisory_xact_lock(?)`, leaseLockKey)
	return err
}

// updateLeased updates a job leased by j.Owner, or returns ErrLeaseLost.
func (d *DB) updateLeased(ctx context.Context, j *Job, set string, args ...any) error {
	args = append(args, d.nowMillis(), j.Repository, j.Digest, j.Tag, j.Owner)
	res, err := d.exec(ctx, d.db, `UPDATE jobs SET `+set+`, updated_at = ?
		WHERE repository = ? AND digest = ? AND tag = ? AND owner = ? AND state = 'converting'`, args...)
	if err != nil {
		return err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return ErrLeaseLost
	}
	return nil
}

// RenewLease extends the lease of a running job to now+lease.
func (d *DB) RenewLease(ctx context.Context, j *Job, lease time.Duration) error {
	until := d.nowMillis() + lease.Milliseconds()
	if err := d.updateLeased(ctx, j, `lease_until = ?`, until); err != nil {
		return fmt.Errorf("renew lease of job %s: %w", j, err)
	}
	j.LeaseUntil = fromMillis(until)
	return nil
}

// CompleteJob marks a leased job done.
func (d *DB) CompleteJob(ctx context.Context, j *Job) error {
	if err := d.updateLeased(ctx, j, `state = 'ready', error = '', lease_until = 0, owner = ''`); err != nil {
		return fmt.Errorf("complete job %s: %w", j, err)
	}
	j.State = jobReady
	return nil
}

// FailJob records a failed attempt of a leased job. While attempts remain
// (fewer than maxAttempts were started) the job is queued again after
// backoff, doubled for every further attempt; otherwise it is failed for
// good, which FailJob reports as final.
func (d *DB) FailJob(ctx context.Context, j *Job, errText string, maxAttempts int, backoff time.Duration) (final bool, err error) {
	if j.Attempts >= maxAttempts {
		err = d.updateLeased(ctx, j, `state = 'failed', error = ?, lease_until = 0, owner = ''`, errText)
		final = true
	} else {
		delay := backoff
		for i := 1; i < j.Attempts && delay < maxBackoff; i++ {
			delay *= 2
		}
		delay = min(delay, maxBackoff)
		err = d.updateLeased(ctx, j, `state = 'queued', error = ?, lease_until = 0, owner = '', not_before = ?`,
			errText, d.nowMillis()+delay.Milliseconds())
	}
	if err != nil {
		return false, fmt.Errorf("fail job %s: %w", j, err)
	}
	j.Error = errText
	if final {
		j.State = jobFailed
	} else {
		j.State = jobQueued
	}
	return final, nil
}

// ReleaseJob gives a leased job back to the queue without counting the
// attempt, for a registry shutting down mid-conversion.
func (d *DB) ReleaseJob(ctx context.Context, j *Job) error {
	if err := d.updateLeased(ctx, j, `state = 'queued', lease_until = 0, owner = '',
		attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END`); err != nil {
		return fmt.Errorf("release job %s: %w", j, err)
	}
	j.State = jobQueued
	return nil
}

// Job returns one job, or ErrNotFound.
func (d *DB) Job(ctx context.Context, repository, digest, tag string) (*Job, error) {
	j, err := scanJob(d.queryRow(ctx, d.db, `SELECT `+jobColumns+` FROM jobs
		WHERE repository = ? AND digest = ? AND tag = ?`, repository, digest, tag))
	if err != nil && !errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("get job %s@%s: %w", repository, digest, err)
	}
	return j, err
}

// Jobs lists up to limit jobs in the given states (all states when none
// is given), oldest first.
func (d *DB) Jobs(ctx context.Context, limit int, states ...string) ([]Job, error) {
	q := `SELECT ` + jobColumns + ` FROM jobs`
	args := make([]any, 0, len(states)+1)
	if len(states) > 0 {
		q += ` WHERE state IN (` + strings.TrimSuffix(strings.Repeat("?, ", len(states)), ", ") + `)`
		for _, s := range states {
			args = append(args, s)
		}
	}
	q += ` ORDER BY created_at, repository, digest, tag LIMIT ?`
	args = append(args, limit)
	rows, err := d.query(ctx, d.db, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list jobs: %w", err)
	}
	defer rows.Close()
	var out []Job
	for rows.Next() {
		j, err := scanJob(rows)
		if err != nil {
			return nil, fmt.Errorf("list jobs: %w", err)
		}
		out = append(out, *j)
	}
	return out, rows.Err()
}

// QueueDepth returns the number of jobs waiting and running.
func (d *DB) QueueDepth(ctx context.Context) (queued, running int, err error) {
	err = d.queryRow(ctx, d.db, `SELECT
		(SELECT COUNT(*) FROM jobs WHERE state = 'queued'),
		(SELECT COUNT(*) FROM jobs WHERE state = 'converting')`).Scan(&queued, &running)
	if err != nil {
		return 0, 0, fmt.Errorf("queue depth: %w", err)
	}
	return queued, running, nil
}
