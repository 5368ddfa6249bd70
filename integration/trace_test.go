package integration

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/integration/harness"
	"github.com/starlight-project/starlight/integration/linkem"
	"github.com/starlight-project/starlight/worker/trace"
)

// TestTraceOrdersBundle is the acceptance test of startup traces: a
// container that reads six files scattered across a large image is run
// traced on worker A and its trace reported; the registry then sends a
// fresh worker those files first, in the order the container read them,
// and the container on worker B, behind a slow link, finishes after a
// small fraction of the bundle has arrived. Assertions are on frame order
// and bytes, never on time.
func TestTraceOrdersBundle(t *testing.T) {
	requireRoot(t)
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	docker := harness.SharedDockerd(t)
	spec, reads := harness.ScatteredImage("starlight-test/scattered:v1", 400)
	const repo, tag = "e2e/scattered", "v1"
	timed(t, "build, push and convert", func() {
		docker.Push(t, harness.BuildImage(t, spec), reg.Addr+"/"+repo+":"+tag)
		reg.WaitReady(t, repo, tag)
	})
	wantSum, err := spec.ConcatSHA256(reads...)
	if err != nil {
		t.Fatal(err)
	}

	untraced, _, err := reg.DeltaHeader(api.DeltaRequest{Reference: repo + ":" + tag})
	if err != nil {
		t.Fatal(err)
	}
	readDigests := contentDigests(t, untraced, reads)
	t.Logf("without traces, the files read are frames %v of %d", framePositions(untraced, readDigests), len(untraced.Frames))

	// Worker A: an optimized run, its trace reported.
	a := harness.StartNode(t, reg.URL)
	const ns = "trace"
	refA := reg.Addr + "/" + repo + ":" + tag
	timed(t, "worker A: ctr-starlight pull --wait", func() { a.Worker.CLI(t, ns, "pull", "--plain-http", "--wait", refA) })
	id := uniqueID("traced")
	out := a.Worker.CLI(t, ns, "--address", a.Containerd.Address, "create", "--optimize", refA, id)
	mustContain(t, "ctr-starlight create --optimize", out, "traced")
	out = a.Containerd.CtrNS(t, ns, "tasks", "start", id)
	mustContain(t, "traced container", out, wantSum)
	a.Containerd.CtrNS(t, ns, "containers", "rm", id)
	tr := pendingTrace(t, a.Worker, id)
	t.Logf("trace %s: %d accesses, partial=%t, dropped=%d", tr.ID, len(tr.Report.Accesses), tr.Partial, tr.Dropped)
	out = a.Worker.CLI(t, ns, "report")
	t.Logf("ctr-starlight report: %s", strings.TrimSpace(out))
	mustContain(t, "ctr-starlight report", out, "sent to "+reg.URL)
	mustContain(t, "ctr-starlight traces after the report", a.Worker.CLI(t, ns, "traces"), "no trace pending")

	// The registry's plan for a fresh worker: the traced chunks first, in
	// traced order.
	traced, _, err := reg.DeltaHeader(api.DeltaRequest{Reference: repo + ":" + tag})
	if err != nil {
		t.Fatal(err)
	}
	want := expectedPrefix(t, traced, tr)
	for i, fi := range want {
		if fi != i {
			t.Errorf("frame %d is %s, want %s, the next chunk in traced order\nframes:\n%s\ntrace:\n%s",
				i, describeFrame(traced, traced.Frames[i]), describeFrame(traced, traced.Frames[fi]),
				describeFrames(traced, 0, len(want)+3), describeTrace(tr))
			break
		}
	}
	t.Logf("the traced frames, first in the bundle:\n%s", describeFrames(traced, 0, len(want)))
	pos := framePositions(traced, readDigests)
	t.Logf("with the trace, the files read are frames %v of %d; the trace names the first %d frames", pos, len(traced.Frames), len(want))
	for i, p := range pos {
		if p >= len(want) {
			t.Errorf("%s is frame %d, after the %d traced frames", reads[i], p, len(want))
		}
		if i > 0 && p <= pos[i-1] {
			t.Errorf("%s (frame %d) does not come after %s (frame %d): not in the order the container read them",
				reads[i], p, reads[i-1], pos[i-1])
		}
	}

	// Worker B, fresh, behind a slow link: the container is done long
	// before the bundle is. The bundle keeps streaming while containerd
	// and runc set the container up; at 10 Mbit/s the 30% bound leaves
	// some 20 s for that on a loaded machine, while the traced frames
	// (about 3 MB) take 2.5 s.
	link := linkem.New(linkem.Profile{RTT: 20 * time.Millisecond, Bandwidth: 10_000_000})
	t.Cleanup(link.Stop)
	addr, err := link.Proxy("127.0.0.1:0", reg.Addr)
	if err != nil {
		t.Fatal(err)
	}
	b := harness.StartNode(t, "http://"+addr.String())
	refB := addr.String() + "/" + repo + ":" + tag
	timed(t, "worker B: ctr-starlight pull (until ready)", func() { b.Worker.CLI(t, ns, "pull", "--plain-http", refB) })
	timed(t, "worker B: ctr run", func() {
		out = b.Containerd.CtrNS(t, ns, "run", "--rm", "--snapshotter", "starlight", refB, uniqueID("cold"))
	})
	p := b.Worker.Progress(t, refB, ns)
	frac := float64(p.BytesReceived) / float64(p.BytesTotal)
	t.Logf("worker B at container exit: %d/%d bytes (%.1f%%), %d/%d frames, complete=%t; link delivered %d bytes",
		p.BytesReceived, p.BytesTotal, 100*frac, p.FramesReceived, p.FramesTotal, p.Complete, link.Stats().BytesDown)
	mustContain(t, "container on worker B", out, wantSum)
	if p.FramesTotal != len(traced.Frames) {
		t.Errorf("worker B's bundle has %d frames, the registry plans %d for a fresh worker", p.FramesTotal, len(traced.Frames))
	}
	if p.Complete || frac >= 0.3 {
		t.Errorf("the container finished after %.1f%% of the bundle had arrived (complete=%t), want < 30%%", 100*frac, p.Complete)
	}
}

// pendingTrace waits for the worker's stored trace of container id (it is
// written when the container's snapshot is removed) and returns it.
func pendingTrace(t *testing.T, w *harness.Worker, id string) *trace.Trace {
	t.Helper()
	dir, err := trace.OpenDir(filepath.Join(w.Root, "traces", "pending"))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		list, err := dir.List()
		if err != nil {
			t.Fatalf("pending traces: %v", err)
		}
		for _, tr := range list {
			if tr.Report.Container == id && !tr.Partial {
				return tr
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no complete trace of container %s after a minute; pending: %d\n%s", id, len(list), w.CLI(t, "trace", "traces"))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// contentDigests returns the content digest of each path as the merged
// image of h sees it (the topmost layer listing it).
func contentDigests(t *testing.T, h *api.BundleHeader, paths []string) []string {
	t.Helper()
	var out []string
	for _, p := range paths {
		name := strings.TrimPrefix(p, "/")
		d := ""
		for _, l := range h.Layers {
			for _, e := range l.Entries {
				if e.Name == name {
					d = e.Digest
				}
			}
		}
		if d == "" {
			t.Fatalf("%s: no content in the bundle header", p)
		}
		out = append(out, d)
	}
	return out
}

// framePositions returns the index of the first frame of each content.
func framePositions(h *api.BundleHeader, digests []string) []int {
	first := map[string]int{}
	for i, f := range h.Frames {
		if _, ok := first[f.Digest]; !ok {
			first[f.Digest] = i
		}
	}
	out := make([]int, len(digests))
	for i, d := range digests {
		p, ok := first[d]
		if !ok {
			p = -1
		}
		out[i] = p
	}
	return out
}

// expectedPrefix returns, as indexes into h.Frames, the frames a single
// trace puts first (TRACES.md §3): for each access in order, the frame of
// its content holding its chunk offset, each frame once; when the trace
// recorded only opens (no access at a chunk offset > 0), the whole file
// travels at its rank.
func expectedPrefix(t *testing.T, h *api.BundleHeader, tr *trace.Trace) []int {
	t.Helper()
	entryDigest := map[string]string{} // layer + "\x00" + name → content
	for _, l := range h.Layers {
		for _, e := range l.Entries {
			entryDigest[l.Digest+"\x00"+e.Name] = e.Digest
		}
	}
	byContent := map[string][]int{}
	for i, f := range h.Frames {
		byContent[f.Digest] = append(byContent[f.Digest], i)
	}
	whole := true
	for _, a := range tr.Report.Accesses {
		if a.ChunkOffset > 0 {
			whole = false
		}
	}
	var out []int
	seen := map[int]bool{}
	add := func(i int) {
		if !seen[i] {
			seen[i] = true
			out = append(out, i)
		}
	}
	for _, a := range tr.Report.Accesses {
		d := a.Digest
		if d == "" {
			d = entryDigest[a.Layer+"\x00"+a.Name]
		}
		if d == "" {
			continue // no content: nothing travels
		}
		frames := byContent[d]
		if len(frames) == 0 {
			t.Fatalf("traced %s (%s) has no frame in the bundle", a.Name, d)
		}
		for _, i := range frames {
			f := h.Frames[i]
			if whole || (a.ChunkOffset >= f.Offset && a.ChunkOffset < f.Offset+f.Size) {
				add(i)
			}
		}
	}
	return out
}

func describeFrame(h *api.BundleHeader, f api.Frame) string {
	for _, l := range h.Layers {
		for _, e := range l.Entries {
			if e.Digest == f.Digest {
				return fmt.Sprintf("%s@%d", e.Name, f.Offset)
			}
		}
	}
	return fmt.Sprintf("%s@%d", f.Digest, f.Offset)
}

func describeFrames(h *api.BundleHeader, from, to int) string {
	var b strings.Builder
	for i := from; i < to && i < len(h.Frames); i++ {
		fmt.Fprintf(&b, "  %d %s\n", i, describeFrame(h, h.Frames[i]))
	}
	return b.String()
}

func describeTrace(tr *trace.Trace) string {
	var b strings.Builder
	for _, a := range tr.Report.Accesses {
		fmt.Fprintf(&b, "  %s@%d (%dns)\n", a.Name, a.ChunkOffset, a.TimeNS)
	}
	return b.String()
}
