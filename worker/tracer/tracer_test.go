package tracer

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/remote"
	"github.com/starlight-project/starlight/worker/config"
	"github.com/starlight-project/starlight/worker/internal/fakeregistry"
	"github.com/starlight-project/starlight/worker/trace"
)

// addSession starts a session by hand, as TracedDirs would, without
// mounting anything.
func addSession(tr *Tracer, key, host string, start time.Time) *session {
	s := &session{key: key, dir: filepath.Join(tr.root, "mnt", "x"), rec: trace.NewRecorder(start), mounts: nil}
	s.t = trace.Trace{ID: trace.NewID(start), Ref: host + "/app:v1", Registry: host, PlainHTTP: true,
		Report: api.TraceReport{Repository: "app", ManifestDigest: "sha256:m", Container: key, StartedAt: start}}
	tr.mu.Lock()
	tr.sessions[key] = s
	tr.mu.Unlock()
	return s
}

// TestTraceStorage follows traces through the disk: checkpoints of running
// containers (partial, replaced as they grow), the final write when the
// container goes, and reporting, which seals running containers.
func TestTraceStorage(t *testing.T) {
	reg := &fakeregistry.Registry{}
	host := fakeregistry.Start(t, reg)
	cfg := config.Default()
	tr, err := New(t.TempDir(), cfg, nil, nil, remote.New(remote.Options{}), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	layer := trace.NewLayer(&api.LayerTree{Digest: "sha256:l", Entries: []api.Entry{
		{Name: "a", Type: api.TypeReg, Size: 1, Digest: "sha256:a"},
		{Name: "b", Type: api.TypeReg, Size: 1, Digest: "sha256:b"},
	}})
	pending := func() []*trace.Trace {
		t.Helper()
		ts, err := tr.dir.List()
		if err != nil {
			t.Fatal(err)
		}
		return ts
	}

	s1 := addSession(tr, "default/1/one", host, time.Now())
	idle := addSession(tr, "default/2/idle", host, time.Now()) // created, never started
	tr.Checkpoint(ctx)
	if len(pending()) != 0 {
		t.Fatal("a checkpoint wrote a trace without accesses")
	}
	s1.rec.Open(layer, "a")
	tr.Checkpoint(ctx)
	if ts := pending(); len(ts) != 1 || !ts[0].Partial || len(ts[0].Report.Accesses) != 1 {
		t.Fatalf("after the first checkpoint: %+v", ts)
	}
	s1.rec.Open(layer, "b")
	if list, _ := tr.List(ctx); len(list) != 1 || !list[0].Recording || list[0].Files != 2 {
		t.Fatalf("listing a running container: %+v", list)
	}
	tr.Untrace(ctx, "default/1/one")
	if ts := pending(); len(ts) != 1 || ts[0].Partial || len(ts[0].Report.Accesses) != 2 || ts[0].ID != s1.t.ID {
		t.Fatalf("after the container went: %+v", ts)
	}

	// A report seals the running containers that have started.
	s2 := addSession(tr, "default/3/two", host, time.Now())
	s2.rec.Open(layer, "b")
	res, err := tr.Report(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Traces) != 2 || res.Traces[0].Error != "" || res.Traces[1].Error != "" || !res.Traces[1].Partial {
		t.Fatalf("report: %+v", res)
	}
	if got := reg.Traces(); len(got) != 2 || got[0].Container != "default/1/one" || len(got[1].Accesses) != 1 {
		t.Fatalf("registry got %+v", got)
	}
	s2.rec.Open(layer, "a") // after the report: not recorded
	idle.rec.Open(layer, "a")
	tr.Untrace(ctx, "default/3/two")
	if ts := pending(); len(ts) != 0 {
		t.Fatalf("a reported run was written again: %+v", ts)
	}
	// The idle container started after the report: it still records.
	tr.Untrace(ctx, "default/2/idle")
	if ts := pending(); len(ts) != 1 || ts[0].Report.Container != "default/2/idle" {
		t.Fatalf("pending %+v", ts)
	}

	// A registry that cannot be reached: the error is kept verbatim, and
	// so is the trace.
	res, err = tr.Report(ctx, "http://127.0.0.1:1")
	if err != nil || len(res.Traces) != 1 || res.Traces[0].Error == "" || res.Traces[0].URL != "http://127.0.0.1:1/starlight/v1/traces" {
		t.Fatalf("report to a dead server: %+v, %v", res, err)
	}
	if len(pending()) != 1 {
		t.Fatal("a failed trace was dropped")
	}
	if _, err := tr.Report(ctx, "ftp://x"); err == nil {
		t.Fatal("an invalid --server was accepted")
	}
}

func TestSplitKey(t *testing.T) {
	for _, tt := range []struct{ key, ns, name string }{
		{"default/12/my-container", "default", "my-container"},
		{"k8s.io/3/a/b", "k8s.io", "a/b"},
		{"bare", "", "bare"},
	} {
		if ns, name := splitKey(tt.key); ns != tt.ns || name != tt.name {
			t.Errorf("splitKey(%q) = %q, %q", tt.key, ns, name)
		}
	}
}

// TestOptimizeModePersists checks that the optimize mode survives a
// restart.
func TestOptimizeModePersists(t *testing.T) {
	root := t.TempDir()
	cfg := config.Default()
	tr, err := New(root, cfg, nil, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if tr.Optimize() {
		t.Fatal("on by default")
	}
	for _, on := range []bool{true, false, true} {
		if err := tr.SetOptimize(on); err != nil {
			t.Fatal(err)
		}
		again, err := New(root, cfg, nil, nil, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		if again.Optimize() != on {
			t.Fatalf("after a restart: optimize %v, want %v", again.Optimize(), on)
		}
	}
	os.WriteFile(filepath.Join(root, optimizeFile), []byte("{"), 0o600)
	if _, err := New(root, cfg, nil, nil, nil, nil); err == nil {
		t.Fatal("a corrupt optimize file was accepted")
	}
}
