package harness

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" database/sql driver
)

// PostgresGlob finds Debian's PostgreSQL server binaries (package
// postgresql, installed by hack/install-deps.sh).
const PostgresGlob = "/usr/lib/postgresql/*/bin"

// PostgresUser is the system user the server runs as: PostgreSQL refuses
// to run as root, and Debian's package creates this one.
const PostgresUser = "postgres"

// Postgres is a private PostgreSQL server: its own cluster (initdb) in a
// temporary directory, a unix socket directory of its own, TCP on an
// ephemeral port of 127.0.0.1, trust authentication, fsync off (the data
// is thrown away with the test).
type Postgres struct {
	Addr string // 127.0.0.1:PORT
	Dir  string
	proc *Process
}

// postgresBin returns the bin directory of the newest installed
// PostgreSQL major version.
func postgresBin() (string, error) {
	dirs, _ := filepath.Glob(PostgresGlob)
	if len(dirs) == 0 {
		return "", fmt.Errorf("no PostgreSQL server in %s: install Debian's postgresql package (hack/install-deps.sh)", PostgresGlob)
	}
	major := func(d string) int {
		n, _ := strconv.Atoi(filepath.Base(filepath.Dir(d)))
		return n
	}
	sort.Slice(dirs, func(i, j int) bool { return major(dirs[i]) < major(dirs[j]) })
	return dirs[len(dirs)-1], nil
}

// StartPostgres initialises a cluster and starts its server as
// PostgresUser; t's cleanup stops exactly that server (fast shutdown,
// which ends its backends) and removes its directory.
func StartPostgres(t T) *Postgres {
	t.Helper()
	bin, err := postgresBin()
	if err != nil {
		t.Fatalf("postgres: %v", err)
	}
	u, err := user.Lookup(PostgresUser)
	if err != nil {
		t.Fatalf("postgres: system user %q: %v (Debian's postgresql package creates it)", PostgresUser, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	cred := &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}

	dir := ShortTempDir(t, "pg-")
	data, sock := filepath.Join(dir, "data"), filepath.Join(dir, "sock")
	for _, d := range []string{dir, data, sock} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatalf("postgres: %v", err)
		}
		if err := os.Chown(d, uid, gid); err != nil {
			t.Fatalf("postgres: %v", err)
		}
	}
	initdb := exec.Command(filepath.Join(bin, "initdb"), "-D", data, "-U", "postgres", "-A", "trust",
		"-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
	initdb.Env = append(os.Environ(), "LC_ALL=C")
	initdb.Dir = dir
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := initdb.CombinedOutput(); err != nil {
		t.Fatalf("postgres: initdb: %v\n%s", err, out)
	}

	pg := &Postgres{Dir: dir}
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		port, err := FreePort()
		if err != nil {
			t.Fatalf("postgres: %v", err)
		}
		pg.Addr = fmt.Sprintf("127.0.0.1:%d", port)
		p, err := startProcessAs("postgres", filepath.Join(dir, "postgres.log"), []string{"LC_ALL=C"}, cred,
			filepath.Join(bin, "postgres"), "-D", data, "-p", strconv.Itoa(port), "-k", sock,
			"-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200")
		if err != nil {
			t.Fatalf("postgres: %v", err)
		}
		lastErr = waitFor(p, 60*time.Second, func() error { return pg.ping("postgres") })
		if lastErr == nil {
			pg.proc = p
			t.Cleanup(func() {
				pg.stop()
				p.dumpOnFailure(t)
			})
			t.Logf("postgres pid %d on %s (dir %s)", p.PID(), pg.Addr, dir)
			return pg
		}
		pg.proc = p
		pg.stop()
		if !strings.Contains(p.Log(8<<10), "Address already in use") {
			t.Fatalf("start postgres: %v\n%s", lastErr, p.Log(32<<10))
		}
	}
	t.Fatalf("start postgres: no free port: %v", lastErr)
	return nil
}

// DSN is the URL of database db on the server, as the starlight
// middleware's database option takes it.
func (pg *Postgres) DSN(db string) string {
	return "postgres://postgres@" + pg.Addr + "/" + db + "?sslmode=disable"
}

func (pg *Postgres) ping(db string) error {
	conn, err := sql.Open("pgx", pg.DSN(db))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return conn.PingContext(ctx)
}

// CreateDatabase creates database name and returns its DSN.
func (pg *Postgres) CreateDatabase(t T, name string) string {
	t.Helper()
	conn, err := sql.Open("pgx", pg.DSN("postgres"))
	if err != nil {
		t.Fatalf("postgres: %v", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := conn.ExecContext(ctx, `CREATE DATABASE "`+name+`"`); err != nil {
		t.Fatalf("postgres: create database %s: %v", name, err)
	}
	return pg.DSN(name)
}

// Log returns the tail of the server's log.
func (pg *Postgres) Log() string { return pg.proc.Log(64 << 10) }

// stop shuts the server down: SIGINT (fast shutdown: it ends its
// backends, then exits), SIGQUIT (immediate shutdown) if that takes more
// than 30 s, SIGKILL last. SIGTERM would wait for every client to leave.
func (pg *Postgres) stop() {
	p := pg.proc
	for _, step := range []struct {
		sig   syscall.Signal
		grace time.Duration
	}{{syscall.SIGINT, 30 * time.Second}, {syscall.SIGQUIT, 10 * time.Second}, {syscall.SIGKILL, time.Minute}} {
		if ok, _ := p.Exited(); ok {
			return
		}
		_ = p.cmd.Process.Signal(step.sig)
		select {
		case <-p.done:
			return
		case <-time.After(step.grace):
		}
	}
}
