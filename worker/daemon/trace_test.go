package daemon

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/client"
	"github.com/starlight-project/starlight/worker/config"
	"github.com/starlight-project/starlight/worker/importer"
	"github.com/starlight-project/starlight/worker/internal/fakeregistry"
)

// ctr runs the ctr command line against the test's containerd.
func ctr(t *testing.T, sock string, args ...string) string {
	t.Helper()
	cmd := exec.Command("/usr/bin/ctr", append([]string{"--address", sock, "--namespace", "default"}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ctr %s: %v\n%s", strings.Join(args, " "), err, out.String())
		}
	case <-time.After(2 * time.Minute):
		cmd.Process.Kill()
		t.Fatalf("ctr %s did not finish; output so far:\n%s", strings.Join(args, " "), out.String())
	}
	return out.String()
}

// waitTraces polls the pending traces until cond holds.
func waitTraces(t *testing.T, c *client.Client, what string, cond func([]api.TraceSummary) bool) []api.TraceSummary {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		traces, err := c.Traces(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if cond(traces) {
			return traces
		}
		if time.Now().After(deadline) {
			t.Fatalf("traces: %s not reached: %+v", what, traces)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func recorded(traces []api.TraceSummary, container string) (api.TraceSummary, bool) {
	for _, tr := range traces {
		if tr.Container == container && !tr.Recording {
			return tr, true
		}
	}
	return api.TraceSummary{}, false
}

// accessIndex returns the index of the first access of name, -1 if none.
func accessIndex(acc []api.TraceAccess, name string) int {
	return slices.IndexFunc(acc, func(a api.TraceAccess) bool { return a.Name == name })
}

func busyboxLayer(t *testing.T) []fakeregistry.File {
	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	return []fakeregistry.File{
		{Name: "bin", Type: api.TypeDir, Mode: 0o755},
		{Name: "bin/busybox", Type: api.TypeReg, Mode: 0o755, Data: busybox},
		{Name: "bin/cat", Type: api.TypeSymlink, Link: "busybox", Mode: 0o777},
		{Name: "bin/sh", Type: api.TypeSymlink, Link: "busybox", Mode: 0o777},
		{Name: "bin/dd", Type: api.TypeSymlink, Link: "busybox", Mode: 0o777},
	}
}

// TestTracing runs traced containers on a real containerd: one created
// with ctr-starlight create --optimize, then every container in optimize
// mode. Each trace lists the container's own first accesses, in order,
// is kept on disk until reported, and reaches the registry as JSON.
func TestTracing(t *testing.T) {
	requireRuntime(t)
	dir, err := os.MkdirTemp("", "slt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	big := bytes.Repeat([]byte("0123456789abcdef"), 128<<10) // 2 MiB, 8 chunks
	img := fakeregistry.BuildImage(t, 256<<10, busyboxLayer(t), []fakeregistry.File{
		{Name: "etc", Type: api.TypeDir, Mode: 0o755},
		{Name: "etc/one.txt", Type: api.TypeReg, Mode: 0o644, Data: []byte("one\n")},
		{Name: "etc/two.txt", Type: api.TypeReg, Mode: 0o644, Data: []byte("two\n")},
		{Name: "etc/three.txt", Type: api.TypeReg, Mode: 0o644, Data: []byte("three\n")},
		{Name: "etc/unread.txt", Type: api.TypeReg, Mode: 0o644, Data: []byte("never read\n")},
		{Name: "data", Type: api.TypeDir, Mode: 0o755},
		{Name: "data/big", Type: api.TypeReg, Mode: 0o644, Data: big},
	})
	reg := &fakeregistry.Registry{Image: img, User: "alice", Password: "s3cret"}
	host := fakeregistry.Start(t, reg)
	other := &fakeregistry.Registry{Image: img}
	otherHost := fakeregistry.Start(t, other)
	ref := host + "/app:v1"

	w := startWorker(t, dir, config.Registry{Host: host, PlainHTTP: true, Username: "alice", Password: "s3cret"})
	sock := startContainerd(t, filepath.Join(dir, "ctrd"), w.cfg.Address)
	ctx := namespaces.WithNamespace(context.Background(), "default")
	if err := w.client.Pull(ctx, api.PullRequest{Ref: ref, Wait: true}, nil); err != nil {
		t.Fatalf("pull: %v", err)
	}
	cc, err := containerd.New(sock, containerd.WithDefaultNamespace("default"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })

	// A traced container reads three files, then a byte 1.2 MB into big
	// (its fifth chunk).
	id := "traced-" + randomID()
	if _, err := client.NewContainer(ctx, cc, client.ContainerOptions{
		Ref: ref, ID: id, Snapshotter: importer.SnapshotterName, Optimize: true,
		Args: []string{"/bin/sh", "-c", "cat /etc/one.txt /etc/two.txt /etc/three.txt; dd if=/data/big bs=4096 skip=300 count=1 2>/dev/null | wc -c"},
	}); err != nil {
		t.Fatal(err)
	}
	// An untraced container of the same image running at the same time
	// adds nothing to the trace.
	ctr(t, sock, "run", "--rm", "--snapshotter", importer.SnapshotterName, ref, "plain-"+randomID(), "/bin/cat", "/etc/unread.txt")
	if out := ctr(t, sock, "task", "start", id); out != "one\ntwo\nthree\n4096\n" {
		t.Fatalf("traced container printed %q", out)
	}
	traces := waitTraces(t, w.client, "recording", func(ts []api.TraceSummary) bool { return len(ts) == 1 })
	if tr := traces[0]; !tr.Recording || tr.Container != id || tr.Ref != ref || tr.Files < 5 {
		t.Fatalf("trace of the running container: %+v", tr)
	}
	ctr(t, sock, "container", "rm", id)
	waitTraces(t, w.client, "trace of "+id+" written", func(ts []api.TraceSummary) bool {
		_, ok := recorded(ts, id)
		return ok
	})

	// Reporting to a registry that fails keeps the trace, with the
	// registry's message verbatim.
	reg.SetTraceFailure("database on fire")
	res, err := w.client.Report(ctx, api.ReportRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Traces) != 1 || !strings.Contains(res.Traces[0].Error, "database on fire") {
		t.Fatalf("report to a failing registry: %+v", res)
	}
	if ts, _ := w.client.Traces(ctx); len(ts) != 1 {
		t.Fatalf("after a failed report: %+v", ts)
	}
	reg.SetTraceFailure("")
	res, err = w.client.Report(ctx, api.ReportRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Traces) != 1 || res.Traces[0].Error != "" || res.Traces[0].URL != "http://"+host+"/starlight/v1/traces" {
		t.Fatalf("report: %+v", res)
	}
	got := reg.Traces()
	if len(got) != 1 {
		t.Fatalf("registry got %d traces", len(got))
	}
	rep := got[0]
	if rep.Repository != "app" || rep.ManifestDigest != img.ManifestDigest.String() || rep.Container != id || rep.StartedAt.IsZero() {
		t.Fatalf("report header: %+v", rep)
	}
	names := make([]string, len(rep.Accesses))
	for i, a := range rep.Accesses {
		names[i] = a.Name
	}
	t.Logf("accesses: %q", names)
	i1, i2, i3 := accessIndex(rep.Accesses, "etc/one.txt"), accessIndex(rep.Accesses, "etc/two.txt"), accessIndex(rep.Accesses, "etc/three.txt")
	if i1 < 0 || !(i1 < i2 && i2 < i3) || accessIndex(rep.Accesses, "bin/busybox") > i1 || accessIndex(rep.Accesses, "etc/unread.txt") >= 0 {
		t.Fatalf("accesses in order %q: want bin/busybox, then etc/one.txt, etc/two.txt, etc/three.txt, and never etc/unread.txt", names)
	}
	layerOf := map[string]string{"bin/busybox": img.Layers[0].Digest, "etc/one.txt": img.Layers[1].Digest, "data/big": img.Layers[1].Digest}
	var last int64
	bigChunks := map[int64]bool{}
	for _, a := range rep.Accesses {
		if want, ok := layerOf[a.Name]; ok && a.Layer != want {
			t.Errorf("%s attributed to layer %s, want %s", a.Name, a.Layer, want)
		}
		if a.TimeNS < last {
			t.Errorf("access times go back: %q", names)
		}
		last = a.TimeNS
		if a.Name == "data/big" {
			bigChunks[a.ChunkOffset] = true
			if a.Digest != digest.FromBytes(big).String() {
				t.Errorf("data/big content digest %s", a.Digest)
			}
		} else if strings.HasPrefix(a.Name, "etc/") && a.ChunkOffset != 0 {
			t.Errorf("chunk access %+v of a single-chunk file", a)
		}
	}
	if !bigChunks[0] || !bigChunks[4*256<<10] {
		t.Errorf("chunks of data/big read: %v, want 0 (open) and %d (the byte read)", bigChunks, 4*256<<10)
	}
	if ts, _ := w.client.Traces(ctx); len(ts) != 0 {
		t.Fatalf("pending after the report: %+v", ts)
	}
	if res, err := w.client.Report(ctx, api.ReportRequest{}); err != nil || len(res.Traces) != 0 {
		t.Fatalf("second report: %+v, %v", res, err)
	}

	// Optimize mode traces every new container, until turned off.
	if on, err := w.client.Optimize(ctx); err != nil || on {
		t.Fatalf("optimize at start: %v, %v", on, err)
	}
	if err := w.client.SetOptimize(ctx, true); err != nil {
		t.Fatal(err)
	}
	run1 := "run-" + randomID()
	if out := ctr(t, sock, "run", "--rm", "--snapshotter", importer.SnapshotterName, ref, run1, "/bin/cat", "/etc/two.txt"); out != "two\n" {
		t.Fatalf("ctr run printed %q", out)
	}
	waitTraces(t, w.client, "trace of "+run1, func(ts []api.TraceSummary) bool {
		_, ok := recorded(ts, run1)
		return ok
	})
	if err := w.client.SetOptimize(ctx, false); err != nil {
		t.Fatal(err)
	}
	ctr(t, sock, "run", "--rm", "--snapshotter", importer.SnapshotterName, ref, "run-"+randomID(), "/bin/cat", "/etc/one.txt")
	if on, _ := w.client.Optimize(ctx); on {
		t.Fatal("optimize still on")
	}
	// --server sends every trace elsewhere.
	res, err = w.client.Report(ctx, api.ReportRequest{Server: "http://" + otherHost})
	if err != nil || len(res.Traces) != 1 || res.Traces[0].Error != "" || res.Traces[0].Container != run1 {
		t.Fatalf("report --server: %+v, %v", res, err)
	}
	if got := other.Traces(); len(got) != 1 || accessIndex(got[0].Accesses, "etc/two.txt") < 0 || accessIndex(got[0].Accesses, "etc/one.txt") >= 0 {
		t.Fatalf("--server registry got %+v", got)
	}
	if len(reg.Traces()) != 1 {
		t.Fatalf("the image's registry got more traces")
	}

	// A report while a traced container runs takes its trace so far; the
	// container records nothing more, so its run is reported once.
	server := "server-" + randomID()
	if _, err := client.NewContainer(ctx, cc, client.ContainerOptions{
		Ref: ref, ID: server, Snapshotter: importer.SnapshotterName, Optimize: true,
		Args: []string{"/bin/sh", "-c", "cat /etc/three.txt >/dev/null; sleep 600"},
	}); err != nil {
		t.Fatal(err)
	}
	ctr(t, sock, "task", "start", "-d", server)
	t.Cleanup(func() { exec.Command("/usr/bin/ctr", "--address", sock, "task", "kill", "-s", "KILL", server).Run() })
	waitTraces(t, w.client, "startup of "+server, func(ts []api.TraceSummary) bool {
		return len(ts) == 1 && ts[0].Recording && ts[0].Files >= 2
	})
	res, err = w.client.Report(ctx, api.ReportRequest{})
	if err != nil || len(res.Traces) != 1 || res.Traces[0].Error != "" || !res.Traces[0].Partial || res.Traces[0].Container != server {
		t.Fatalf("report of a running container: %+v, %v", res, err)
	}
	ctr(t, sock, "task", "kill", "-s", "KILL", server)
	ctr(t, sock, "task", "delete", "-f", server)
	ctr(t, sock, "container", "rm", server)
	deadline := time.Now().Add(60 * time.Second)
	for w.d.Tracer.Active() > 0 {
		if time.Now().After(deadline) {
			t.Fatal("the traced container's snapshot was not removed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if ts, _ := w.client.Traces(ctx); len(ts) != 0 {
		t.Fatalf("a reported run left a trace: %+v", ts)
	}
	if got := reg.Traces(); len(got) != 2 || accessIndex(got[1].Accesses, "etc/three.txt") < 0 {
		t.Fatalf("registry traces %+v", got)
	}
}
