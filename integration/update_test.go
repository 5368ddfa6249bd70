package integration

import (
	"fmt"
	"strings"
	"testing"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/integration/harness"
	"github.com/starlight-project/starlight/integration/linkem"
)

// TestUpdateTransfersOnlyChangedContents is the acceptance test of updates:
// v2 of an image, rebuilt on a modified base so that every layer digest
// differs while about 5% of the content bytes changed, is pulled by a
// worker that holds v1. The pull moves only the changed contents plus the
// bundle header (asserted on the worker's byte counters, the registry's
// counters the worker records, and the bytes the link delivered), and both
// versions run.
func TestUpdateTransfersOnlyChangedContents(t *testing.T) {
	requireRoot(t)
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	docker := harness.SharedDockerd(t)
	pair := harness.UpdateImages("starlight-test/update:v1", "starlight-test/update:v2")
	const repo = "e2e/update"

	timed(t, "build and push v1", func() {
		docker.Push(t, harness.BuildImage(t, pair.V1), reg.Addr+"/"+repo+":v1")
		reg.WaitReady(t, repo, "v1")
	})

	// An unlimited link in front of the registry counts what the worker
	// receives on the wire, HTTP framing and bundle header included.
	link := linkem.New(linkem.Profile{})
	t.Cleanup(link.Stop)
	addr, err := link.Proxy("127.0.0.1:0", reg.Addr)
	if err != nil {
		t.Fatal(err)
	}
	node := harness.StartNode(t, "http://"+addr.String())
	ctd, w := node.Containerd, node.Worker
	const ns = "update"
	ref1 := addr.String() + "/" + repo + ":v1"
	ref2 := addr.String() + "/" + repo + ":v2"

	timed(t, "ctr-starlight pull --wait v1", func() { w.CLI(t, ns, "pull", "--plain-http", "--wait", ref1) })
	p1 := w.Progress(t, ref1, ns)
	t.Logf("v1: image %d B, dedup %d B, sent %d B, received %d/%d B", p1.ImageBytes, p1.DedupBytes, p1.SendBytes, p1.BytesReceived, p1.BytesTotal)
	if !p1.Complete || p1.Error != "" {
		t.Fatalf("v1 is not complete after pull --wait: %+v", p1)
	}
	if p1.DedupBytes != 0 {
		t.Errorf("a fresh worker deduplicated %d bytes of v1", p1.DedupBytes)
	}
	runChecks(t, ctd, ns, ref1, pair.V1, pair.Changed)

	timed(t, "build and push v2", func() {
		docker.Push(t, harness.BuildImage(t, pair.V2), reg.Addr+"/"+repo+":v2")
		reg.WaitReady(t, repo, "v2")
	})

	// What v2 changes, from the registry's own plans for a worker that
	// holds nothing: the contents of v2 that no layer of v1 lists, and the
	// compressed size of their frames.
	h1, _, err := reg.DeltaHeader(api.DeltaRequest{Reference: repo + ":v1"})
	if err != nil {
		t.Fatal(err)
	}
	h2, headerBytes, err := reg.DeltaHeader(api.DeltaRequest{Reference: repo + ":v2"})
	if err != nil {
		t.Fatal(err)
	}
	v1Layers := map[string]bool{}
	v1Contents := map[string]bool{}
	for _, l := range h1.Layers {
		v1Layers[l.Digest] = true
		for _, e := range l.Entries {
			if e.Digest != "" {
				v1Contents[e.Digest] = true
			}
		}
	}
	for _, l := range h2.Layers {
		if v1Layers[l.Digest] {
			t.Fatalf("v2 shares layer %s with v1: the test needs every layer digest to differ", l.Digest)
		}
	}
	var changedBytes, unchangedBytes int64
	changedContents := map[string]bool{}
	for _, f := range h2.Frames {
		if v1Contents[f.Digest] {
			unchangedBytes += f.CompressedSize
		} else {
			changedBytes += f.CompressedSize
			changedContents[f.Digest] = true
		}
	}
	total, changedRaw := pair.V2.ContentBytes(pair.Changed)
	t.Logf("v2: %d B of file content, %d B (%.1f%%) changed in %d files; compressed: image %d B, changed contents %d B in %d contents, bundle header %d B",
		total, changedRaw, 100*float64(changedRaw)/float64(total), len(pair.Changed), h2.Stats.ImageBytes, changedBytes, len(changedContents), headerBytes)
	if len(changedContents) != len(pair.Changed) {
		t.Errorf("the registry's v2 has %d contents that v1 lacks, the test changed %d files", len(changedContents), len(pair.Changed))
	}

	before := link.Stats()
	timed(t, "ctr-starlight pull --wait v2", func() { w.CLI(t, ns, "pull", "--plain-http", "--wait", ref2) })
	after := link.Stats()
	wire := after.BytesDown - before.BytesDown
	p2 := w.Progress(t, ref2, ns)
	t.Logf("v2 pull: registry counters image %d B, dedup %d B, sent %d B; worker received %d/%d B in %d frames; link delivered %d B (%.1f%% of the image's compressed contents)",
		p2.ImageBytes, p2.DedupBytes, p2.SendBytes, p2.BytesReceived, p2.BytesTotal, p2.FramesReceived, wire, 100*float64(wire)/float64(p2.ImageBytes))

	if !p2.Complete || p2.Error != "" {
		t.Errorf("v2 is not complete after pull --wait: %+v", p2)
	}
	// The registry's counters, as the worker recorded them.
	if p2.ImageBytes != h2.Stats.ImageBytes {
		t.Errorf("image bytes %d, the registry's plan says %d", p2.ImageBytes, h2.Stats.ImageBytes)
	}
	if p2.SendBytes > changedBytes {
		t.Errorf("the registry sent %d bytes of contents, the changed contents are %d", p2.SendBytes, changedBytes)
	}
	if p2.DedupBytes+p2.SendBytes != p2.ImageBytes {
		t.Errorf("dedup %d + sent %d != image %d", p2.DedupBytes, p2.SendBytes, p2.ImageBytes)
	}
	// Every unchanged content was left out: dedup is exactly the
	// unchanged contents, counted in v2's blobs like the rest.
	if p2.DedupBytes != unchangedBytes {
		t.Errorf("dedup %d bytes, the unchanged contents are %d", p2.DedupBytes, unchangedBytes)
	}
	// The worker's own count of what arrived.
	if p2.BytesReceived != p2.BytesTotal || p2.BytesTotal != p2.SendBytes {
		t.Errorf("worker received %d of %d bytes, the registry sent %d", p2.BytesReceived, p2.BytesTotal, p2.SendBytes)
	}
	if p2.BytesReceived > changedBytes {
		t.Errorf("worker received %d bytes of contents, the changed contents are %d", p2.BytesReceived, changedBytes)
	}
	// On the wire: the changed contents, the header (the one planned for
	// an empty worker lists more frames, so it bounds the worker's), and
	// HTTP requests, response headers and chunk framing.
	const framing = 64 << 10
	if limit := changedBytes + headerBytes + framing; wire > limit {
		t.Errorf("the link delivered %d bytes for the v2 pull, more than changed contents %d + header %d + %d framing",
			wire, changedBytes, headerBytes, framing)
	}

	runChecks(t, ctd, ns, ref2, pair.V2, pair.Changed)
	// v1 still runs from the same store.
	runChecks(t, ctd, ns, ref1, pair.V1, pair.Changed)
}

// runChecks runs a container of ref on the starlight snapshotter that
// prints the release files and the sha256 of the changed files and of an
// unchanged file of each layer, and checks them against spec.
func runChecks(t *testing.T, ctd *harness.Containerd, ns, ref string, spec harness.ImageSpec, changed []string) {
	t.Helper()
	files := append([]string{"/usr/share/base/f000", "/app/data/d000"}, changed...)
	script := "cat /etc/base-release /app/VERSION; stat -c '%n %a' /usr/share/base; sha256sum " + strings.Join(files, " ")
	out := ctd.CtrNS(t, ns, "run", "--rm", "--snapshotter", "starlight", ref, uniqueID("upd"), "/bin/sh", "-c", script)
	var wants []string
	for _, f := range files {
		e, ok := spec.Lookup(f)
		if !ok {
			t.Fatalf("%s has no %s", spec.Name, f)
		}
		sum, err := e.SHA256()
		if err != nil {
			t.Fatal(err)
		}
		wants = append(wants, sum+"  "+f)
	}
	for _, f := range []string{"/etc/base-release", "/app/VERSION"} {
		e, _ := spec.Lookup(f)
		wants = append(wants, string(e.Content))
	}
	dir, _ := spec.Lookup("/usr/share/base")
	wants = append(wants, fmt.Sprintf("/usr/share/base %o", dir.Mode))
	mustContain(t, "container of "+ref, out, wants...)
}
