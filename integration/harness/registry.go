package harness

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/starlight-project/starlight/api"
)

// RegistryOptions configure StartRegistry.
type RegistryOptions struct {
	// Htpasswd turns on htpasswd auth with these user → password pairs.
	Htpasswd map[string]string
	// NoAutoConvert turns automatic conversion on push off.
	NoAutoConvert bool
	// TagSuffix of converted images; "-starlight" when empty.
	TagSuffix string
	// Workers is the conversion concurrency; 2 when zero.
	Workers int
	// LogLevel of the registry; "info" when empty.
	LogLevel string
	// TLS, if set, makes the registry serve HTTPS with the CA's server
	// certificate (URL is then https://); the helpers trust the CA.
	TLS *CA
	// Options are more starlight middleware options (name → YAML value).
	Options map[string]string
	// S3, if set, stores the registry's content in this bucket (the s3-aws
	// storage driver) instead of a private directory. Replicas given the
	// same bucket and Database serve the same images.
	S3 *S3Bucket
	// Database is the index DSN (e.g. Postgres.CreateDatabase); a private
	// SQLite file when empty.
	Database string
}

// Registry is a running starlight-registry.
type Registry struct {
	Addr       string // 127.0.0.1:PORT
	URL        string // http://127.0.0.1:PORT (https:// with RegistryOptions.TLS)
	Dir        string // config, storage, database and log
	ConfigPath string
	// User and Password are sent by the helpers when the registry has auth.
	User, Password string
	proc           *Process
	client         *http.Client
}

// StartRegistry writes a config.yml (filesystem storage, SQLite index,
// the starlight middleware, a free port on 127.0.0.1) into a private
// directory, starts bin/starlight-registry on it and waits for /v2/ to
// answer. The registry is stopped in t's cleanup.
func StartRegistry(t T, opts RegistryOptions) *Registry {
	t.Helper()
	bin := filepath.Join(Binaries(t), RegistryBinary)
	dir := ShortTempDir(t, "reg-")
	r := &Registry{Dir: dir, ConfigPath: filepath.Join(dir, "config.yml"), client: &http.Client{Timeout: 30 * time.Second}}
	scheme := "http"
	if opts.TLS != nil {
		scheme = "https"
		r.client.Transport = &http.Transport{TLSClientConfig: opts.TLS.TLSConfig()}
	}
	htpasswd := ""
	if len(opts.Htpasswd) > 0 {
		htpasswd = filepath.Join(dir, "htpasswd")
		if err := writeHtpasswd(htpasswd, opts.Htpasswd); err != nil {
			t.Fatalf("registry: %v", err)
		}
		users := make([]string, 0, len(opts.Htpasswd))
		for u := range opts.Htpasswd {
			users = append(users, u)
		}
		sort.Strings(users)
		r.User, r.Password = users[0], opts.Htpasswd[users[0]]
	}
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		port, err := FreePort()
		if err != nil {
			t.Fatalf("registry: %v", err)
		}
		r.Addr = fmt.Sprintf("127.0.0.1:%d", port)
		r.URL = scheme + "://" + r.Addr
		cfg := RegistryConfig(dir, r.Addr, htpasswd, opts)
		if err := os.WriteFile(r.ConfigPath, []byte(cfg), 0o644); err != nil {
			t.Fatalf("registry config: %v", err)
		}
		p, err := startProcess("starlight-registry", filepath.Join(dir, "registry.log"),
			[]string{"OTEL_TRACES_EXPORTER=none"}, bin, "serve", r.ConfigPath)
		if err != nil {
			t.Fatalf("registry: %v", err)
		}
		lastErr = waitFor(p, 60*time.Second, r.ping)
		if lastErr == nil {
			r.proc = p
			t.Cleanup(func() {
				// The process running now: Restart replaces it.
				r.proc.Stop(10 * time.Second)
				r.proc.dumpOnFailure(t)
			})
			t.Logf("starlight-registry pid %d on %s (dir %s)", p.PID(), r.Addr, dir)
			return r
		}
		p.Stop(5 * time.Second)
		if !strings.Contains(p.Log(8<<10), "address already in use") {
			t.Fatalf("start registry: %v\n%s", lastErr, p.Log(32<<10))
		}
	}
	t.Fatalf("start registry: no free port: %v", lastErr)
	return nil
}

// RegistryConfig is the distribution config.yml used by StartRegistry.
func RegistryConfig(dir, addr, htpasswd string, opts RegistryOptions) string {
	suffix := opts.TagSuffix
	if suffix == "" {
		suffix = "-starlight"
	}
	workers := opts.Workers
	if workers == 0 {
		workers = 2
	}
	level := opts.LogLevel
	if level == "" {
		level = "info"
	}
	database := opts.Database
	if database == "" {
		database = filepath.Join(dir, "index.db")
	}
	options := fmt.Sprintf(`      options:
        database: %q
        autoconvert: %t
        tagsuffix: "%s"
        workers: %d
`, database, !opts.NoAutoConvert, suffix, workers)
	for _, k := range sortedKeys(opts.Options) {
		options += fmt.Sprintf("        %s: %s\n", k, opts.Options[k])
	}
	var b strings.Builder
	fmt.Fprintf(&b, `version: 0.1
log:
  level: %s
  formatter: text
storage:
%s  delete:
    enabled: true
http:
  addr: %s
  secret: starlight-integration-test
`, level, storageConfig(dir, opts.S3), addr)
	if opts.TLS != nil {
		fmt.Fprintf(&b, "  tls:\n    certificate: %s\n    key: %s\n", opts.TLS.CertFile, opts.TLS.KeyFile)
	}
	if htpasswd != "" {
		fmt.Fprintf(&b, `auth:
  htpasswd:
    realm: starlight
    path: %s
`, htpasswd)
	}
	b.WriteString("middleware:\n  registry:\n    - name: starlight\n" + options)
	b.WriteString("  repository:\n    - name: starlight\n" + options)
	return b.String()
}

// storageConfig is the storage driver section of RegistryConfig.
func storageConfig(dir string, b *S3Bucket) string {
	if b == nil {
		return fmt.Sprintf("  filesystem:\n    rootdirectory: %s\n", filepath.Join(dir, "storage"))
	}
	return fmt.Sprintf(`  s3:
    regionendpoint: %s
    region: %s
    bucket: %s
    accesskey: %s
    secretkey: %s
    forcepathstyle: true
    secure: false
`, b.URL, b.Region, b.Name, b.AccessKey, b.SecretKey)
}

func writeHtpasswd(path string, users map[string]string) error {
	var b bytes.Buffer
	for u, p := range users {
		h, err := bcrypt.GenerateFromPassword([]byte(p), bcrypt.MinCost)
		if err != nil {
			return fmt.Errorf("bcrypt: %w", err)
		}
		fmt.Fprintf(&b, "%s:%s\n", u, h)
	}
	return os.WriteFile(path, b.Bytes(), 0o600)
}

// PID is the registry process's id.
func (r *Registry) PID() int { return r.proc.PID() }

// Log returns the tail of the registry log.
func (r *Registry) Log() string { return r.proc.Log(64 << 10) }

// Stop stops the registry now (the cleanup then does nothing).
func (r *Registry) Stop() { r.proc.Stop(10 * time.Second) }

// Kill kills the registry with SIGKILL, as a crash or the OOM killer
// would, and waits for it to exit.
func (r *Registry) Kill() { r.proc.Kill() }

// Restart starts the registry again, stopped or killed, on the same
// configuration, storage, database and address, and waits for /v2/ to
// answer.
func (r *Registry) Restart(t T) {
	t.Helper()
	r.proc.Stop(10 * time.Second)
	bin := filepath.Join(Binaries(t), RegistryBinary)
	p, err := startProcess("starlight-registry", filepath.Join(r.Dir, "registry.log"),
		[]string{"OTEL_TRACES_EXPORTER=none"}, bin, "serve", r.ConfigPath)
	if err != nil {
		t.Fatalf("restart registry: %v", err)
	}
	r.proc = p
	if err := waitFor(p, 60*time.Second, r.ping); err != nil {
		t.Fatalf("restart registry: %v\n%s", err, p.Log(32<<10))
	}
	t.Logf("starlight-registry restarted, pid %d on %s", p.PID(), r.Addr)
}

// ping succeeds once /v2/ answers (401 counts: auth is on).
func (r *Registry) ping() error {
	resp, err := r.client.Get(r.URL + "/v2/")
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusUnauthorized {
		return fmt.Errorf("GET /v2/: %s", resp.Status)
	}
	return nil
}

// Do sends req with the registry's credentials (if any) and returns the
// response with its body read.
func (r *Registry) Do(req *http.Request, auth bool) (*http.Response, []byte, error) {
	if auth && r.User != "" {
		req.SetBasicAuth(r.User, r.Password)
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	return resp, body, err
}

// Get fetches path ("/v2/...") with or without credentials.
func (r *Registry) Get(path string, auth bool) (*http.Response, []byte, error) {
	req, err := http.NewRequest(http.MethodGet, r.URL+path, nil)
	if err != nil {
		return nil, nil, err
	}
	return r.Do(req, auth)
}

// StatusPath is the status API path of repo at ref (tag or digest).
func StatusPath(repo, ref string) string {
	return "/starlight/v1/images/" + repo + "/" + ref
}

// Status asks the status API about repo:ref. It returns the HTTP status
// code too; the ImageStatus is decoded only on 200.
func (r *Registry) Status(repo, ref string) (api.ImageStatus, int, error) {
	var st api.ImageStatus
	resp, body, err := r.Get(StatusPath(repo, ref), true)
	if err != nil {
		return st, 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return st, resp.StatusCode, fmt.Errorf("GET %s: %s: %s", StatusPath(repo, ref), resp.Status, bytes.TrimSpace(body))
	}
	if err := json.Unmarshal(body, &st); err != nil {
		return st, resp.StatusCode, fmt.Errorf("decode status %q: %w", body, err)
	}
	return st, resp.StatusCode, nil
}

// WaitDone polls the status API until repo:ref is ready or failed, and
// returns the final status. The deadline is generous: conversion shares
// two cores with everything else.
func (r *Registry) WaitDone(t T, repo, ref string) api.ImageStatus {
	t.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	var last api.ImageStatus
	var lastErr error
	for time.Now().Before(deadline) {
		st, code, err := r.Status(repo, ref)
		switch {
		case err == nil && (st.State == api.StateReady || st.State == api.StateFailed):
			return st
		case err == nil:
			last, lastErr = st, nil
		case code == http.StatusNotFound:
			// The job may not be queued yet right after the push.
			lastErr = err
		default:
			lastErr = err
		}
		if exited, werr := r.proc.Exited(); exited {
			t.Fatalf("registry exited (%v) while waiting for %s:%s", werr, repo, ref)
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("%s:%s not converted in time: last status %+v, last error %v", repo, ref, last, lastErr)
	return last
}

// WaitReady is WaitDone that fails the test unless the image is ready.
func (r *Registry) WaitReady(t T, repo, ref string) api.ImageStatus {
	t.Helper()
	st := r.WaitDone(t, repo, ref)
	if st.State != api.StateReady {
		t.Fatalf("%s:%s: state %q, error %q", repo, ref, st.State, st.Error)
	}
	return st
}
