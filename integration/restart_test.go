package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/integration/harness"
	"github.com/starlight-project/starlight/integration/linkem"
)

// restartFiles is the number of small files the container of
// TestWorkerRestartKeepsContainers reads, one every 100 ms and each once,
// so that every read is a cold lookup, open and read through the worker's
// view (no page cache to answer it).
const restartFiles = 1200

// restartScript reads /files/NNNN, one file every 100 ms, logging "ok" or
// "fail ..." per read in /out/reads, and checksums /big.bin in a loop,
// logging "sum HEX" per pass in /out/sums.
var restartScript = fmt.Sprintf(`
( while :; do s=$(sha256sum /big.bin 2>&1) || s="ERR $s"; echo "sum $s" >> /out/sums; sleep 1; done ) &
i=0
while :; do
	f=/files/$(( i %% %d ))
	if cat "$f" > /dev/null 2> /out/err; then echo ok >> /out/reads; else echo "fail $f $(cat /out/err)" >> /out/reads; fi
	i=$(( i + 1 ))
	sleep 0.1
done
`, restartFiles)

// TestWorkerRestartKeepsContainers is the acceptance test of a worker
// restart: a container runs on an image that is still arriving through a
// slow link, reading a file every 100 ms and checksumming a large file,
// while the worker is killed with SIGKILL and started again 5 times, then
// stopped with SIGTERM and started again 5 times. No read fails, every
// checksum is right, the image shows as pulling after each start and the
// pull completes by itself.
func TestWorkerRestartKeepsContainers(t *testing.T) {
	requireRoot(t)
	const bigSize = 24 << 20
	files := harness.Layer{{Name: "/big.bin", RandomSize: bigSize, RandomSeed: 11}}
	for i := range restartFiles {
		files = append(files, harness.Entry{Name: fmt.Sprintf("/files/%d", i), RandomSize: 4096, RandomSeed: uint64(1000 + i)})
	}
	spec := harness.ImageSpec{Name: "starlight-test/restart:v1", Layers: []harness.Layer{harness.BusyboxLayer(), files}}
	wantSum, err := files[0].SHA256()
	if err != nil {
		t.Fatal(err)
	}

	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	docker := harness.SharedDockerd(t)
	img := harness.BuildImage(t, spec)
	docker.Push(t, img, reg.Addr+"/e2e/restart:v1")
	reg.WaitReady(t, "e2e/restart", "v1")
	// About 30 MB at 6 Mbit/s: some 40 s, more than the restarts take.
	link := linkem.New(linkem.Profile{RTT: 20 * time.Millisecond, Bandwidth: 6_000_000})
	t.Cleanup(link.Stop)
	addr, err := link.Proxy("127.0.0.1:0", reg.Addr)
	if err != nil {
		t.Fatal(err)
	}
	ref := addr.String() + "/e2e/restart:v1"
	node := harness.StartNodeWith(t, harness.WorkerOptions{Registries: []string{"http://" + addr.String()}, LogLevel: "info"})
	ctd, w := node.Containerd, node.Worker
	const ns = "restart"

	w.CLI(t, ns, "pull", "--plain-http", ref)
	out := harness.ShortTempDir(t, "out-")
	id := uniqueID("restart")
	ctd.CtrNS(t, ns, "run", "-d", "--snapshotter", "starlight",
		"--mount", "type=bind,src="+out+",dst=/out,options=rbind:rw", ref, id, "/bin/sh", "-c", restartScript)
	waitLines(t, filepath.Join(out, "reads"), 5)

	p := w.Progress(t, ref, ns)
	t.Logf("before the first kill: %d of %d bytes, %d of %d frames", p.BytesReceived, p.BytesTotal, p.FramesReceived, p.FramesTotal)
	if p.Complete {
		t.Fatal("the image arrived whole before the first kill: the test would not restart the worker during a pull (slow the link down)")
	}
	for round := range 10 {
		how := "kill -9"
		if round < 5 {
			w.Kill(t)
		} else {
			how = "SIGTERM"
			w.Stop(t)
		}
		// Reads issued now wait in the kernel.
		time.Sleep(500 * time.Millisecond)
		before := countLines(t, filepath.Join(out, "reads"))
		w.Restart(t)
		p := w.Progress(t, ref, ns)
		t.Logf("%s and start %d: worker pid %d; image %s, %d of %d bytes, %d resumes", how, round%5+1, w.PID(), p.State, p.BytesReceived, p.BytesTotal, p.Resumes)
		if p.State == api.PullFailed {
			t.Fatalf("after %s and start, the image shows as failed: %s", how, p.Error)
		}
		if !p.Complete && p.State != api.PullReady {
			t.Errorf("after %s and start, the image still arriving shows as %q, want %q", how, p.State, api.PullReady)
		}
		// The container goes on reading through the new worker.
		waitLines(t, filepath.Join(out, "reads"), before+5)
	}

	// The pull completes by itself.
	deadline := time.Now().Add(10 * time.Minute)
	for {
		p = w.Progress(t, ref, ns)
		if p.Complete || p.State == api.PullFailed || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("pull: %s, %d of %d bytes, %d resumes; the link carried %d bytes down", p.State, p.BytesReceived, p.BytesTotal, p.Resumes, link.Stats().BytesDown)
	if !p.Complete || p.State != api.PullComplete {
		t.Fatalf("the pull did not complete by itself: %+v", p)
	}
	// Every checksum pass started after the last restart has ended.
	sums := countLines(t, filepath.Join(out, "sums"))
	waitLines(t, filepath.Join(out, "sums"), sums+1)
	if st := ctd.CtrNS(t, ns, "tasks", "ls"); !strings.Contains(st, id) || !strings.Contains(st, "RUNNING") {
		t.Errorf("the container does not run any more:\n%s", st)
	}
	ctd.CtrNSE(ns, "tasks", "kill", "-s", "SIGKILL", id)

	reads := readLines(t, filepath.Join(out, "reads"))
	var failed []string
	for _, l := range reads {
		if l != "ok" {
			failed = append(failed, l)
		}
	}
	var good, bad int
	for _, l := range readLines(t, filepath.Join(out, "sums")) {
		if strings.HasPrefix(l, "sum "+wantSum+" ") {
			good++
		} else {
			bad++
			t.Errorf("checksum pass: %q, want %s", l, wantSum)
		}
	}
	t.Logf("the container read %d files (%d failed) and checksummed /big.bin %d times (%d wrong) across 10 restarts", len(reads), len(failed), good+bad, bad)
	if len(failed) > 0 {
		t.Errorf("%d reads failed, first: %q", len(failed), failed[:min(len(failed), 5)])
	}
	if good == 0 {
		t.Error("no checksum pass completed")
	}
}

func readLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	s := strings.TrimSpace(string(b))
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

func countLines(t *testing.T, path string) int { return len(readLines(t, path)) }

// waitLines waits until the file at path has at least n lines.
func waitLines(t *testing.T, path string, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	for countLines(t, path) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d lines after 5 minutes, want %d", path, countLines(t, path), n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
