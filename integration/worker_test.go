package integration

import (
	"strings"
	"testing"
	"time"

	"github.com/starlight-project/starlight/integration/harness"
	"github.com/starlight-project/starlight/integration/linkem"
)

// TestWorkerRunsPushedImage is the acceptance test of the worker: an image
// pushed with docker runs on a fresh worker after `ctr-starlight pull`,
// through `ctr run` and through `ctr c create` + `ctr t start`, and its
// rootfs equals, file by file, the overlayfs pull of the same image. It
// runs against containerd 1.6 and containerd 2, each a fresh node on the
// same registry and pushed image.
func TestWorkerRunsPushedImage(t *testing.T) {
	requireRoot(t)
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	docker := harness.SharedDockerd(t)
	spec := harness.TrickyImage("starlight-test/tricky:w1")
	img := harness.BuildImage(t, spec)
	const repo, tag = "e2e/worker", "v1"
	ref := reg.Addr + "/" + repo + ":" + tag
	docker.Push(t, img, ref)
	reg.WaitReady(t, repo, tag)

	for _, v := range harness.ContainerdVersions {
		t.Run(v.String(), func(t *testing.T) { workerRunsPushedImage(t, v, reg, spec, repo, ref) })
	}
}

func workerRunsPushedImage(t *testing.T, v harness.ContainerdVersion, reg *harness.Registry, spec harness.ImageSpec, repo, ref string) {
	node := harness.StartNodeOn(t, v, harness.WorkerOptions{Registries: []string{reg.URL}})
	ctd, w := node.Containerd, node.Worker
	const ns, plainNS = "sl", "plain"
	var pullOut string
	timed(t, "ctr-starlight pull", func() { pullOut = w.CLI(t, ns, "pull", "--plain-http", ref) })
	t.Logf("ctr-starlight pull: %s", pullOut)

	// The same image through containerd's own pull and overlayfs, in
	// another namespace so the two image records do not clash.
	timed(t, "ctr pull", func() { ctd.CtrNS(t, plainNS, "images", "pull", "--plain-http", ref) })
	want := ctd.CtrNS(t, plainNS, "run", "--rm", "--snapshotter", "overlayfs", ref, uniqueID("plain"), "/bin/sh", "-c", probeScript(false))
	mustContain(t, "overlayfs run", want, expectedProbe(t, spec)...)

	var got string
	timed(t, "ctr run --snapshotter starlight", func() {
		got = ctd.CtrNS(t, ns, "run", "--rm", "--snapshotter", "starlight", ref, uniqueID("sl"), "/bin/sh", "-c", probeScript(false))
	})
	mustContain(t, "starlight run", got, expectedProbe(t, spec)...)
	if got != want {
		t.Errorf("starlight container prints something else than overlayfs:\n--- overlayfs\n%s\n--- starlight\n%s", want, got)
	}

	t.Run("create and start", func(t *testing.T) {
		id := uniqueID("create")
		ctd.CtrNS(t, ns, "containers", "create", "--snapshotter", "starlight", ref, id, "cat", "/data/hello.txt", "/small.txt")
		defer ctd.CtrNSE(ns, "containers", "rm", id)
		out := ctd.CtrNS(t, ns, "tasks", "start", id)
		mustContain(t, "ctr t start", out, "hello again from layer 3", "small file at the root")
	})

	t.Run("rootfs equivalence", func(t *testing.T) {
		a := ctd.MountImage(t, plainNS, "overlayfs", ref)
		b := ctd.MountImage(t, ns, "starlight", ref)
		diff, err := harness.CompareTrees(a, b, harness.CompareOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if diff != "" {
			t.Errorf("starlight rootfs differs from overlayfs (A=overlayfs, B=starlight):\n%s", diff)
		}
	})

	t.Run("images", func(t *testing.T) {
		// Everything has arrived once the tree was read in full.
		deadline := time.Now().Add(2 * time.Minute)
		for {
			p := w.Progress(t, ref, ns)
			if p.Complete {
				if p.BytesReceived != p.BytesTotal {
					t.Errorf("complete with %d of %d bytes", p.BytesReceived, p.BytesTotal)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("not complete: %+v", p)
			}
			time.Sleep(200 * time.Millisecond)
		}
		out := w.CLI(t, ns, "images")
		mustContain(t, "ctr-starlight images", out, repo)
	})
}

// TestWorkerLazyStart checks that a container that reads one small file of
// a large image runs before the image's bundle has finished arriving over
// a slow link. The assertion is on bytes (the worker's progress and the
// link's counters), not on time.
func TestWorkerLazyStart(t *testing.T) {
	requireRoot(t)
	const bigSize = 60 << 20
	ref, addr, link := pushBehindSlowLink(t, harness.LazyImage("starlight-test/lazy:v1", bigSize), "e2e/lazy:v1")
	node := harness.StartNode(t, "http://"+addr)
	ctd, w := node.Containerd, node.Worker
	const ns = "lazy"

	timed(t, "ctr-starlight pull", func() { w.CLI(t, ns, "pull", "--plain-http", ref) })
	var out string
	timed(t, "ctr run cat /small.txt", func() {
		out = ctd.CtrNS(t, ns, "run", "--rm", "--snapshotter", "starlight", ref, uniqueID("lazy"), "cat", "/small.txt")
	})
	p := w.Progress(t, ref, ns)
	down := link.Stats().BytesDown
	t.Logf("after the container ran: worker %d/%d bytes, %d/%d frames, complete=%t; link delivered %d bytes",
		p.BytesReceived, p.BytesTotal, p.FramesReceived, p.FramesTotal, p.Complete, down)

	if !strings.Contains(out, "small file at the root") {
		t.Fatalf("container output %q", out)
	}
	if p.Complete {
		t.Errorf("the bundle was complete before the container finished: %+v", p)
	}
	if p.BytesTotal < bigSize {
		t.Errorf("worker reports %d bytes in the bundle, the image holds %d incompressible bytes", p.BytesTotal, bigSize)
	}
	if p.BytesReceived >= p.BytesTotal {
		t.Errorf("worker received %d of %d bytes: nothing left to arrive", p.BytesReceived, p.BytesTotal)
	}
	if down >= bigSize {
		t.Errorf("the link delivered %d bytes before the container finished, the big file alone is %d", down, bigSize)
	}
}

// TestWorkerDemandFetch checks that a container reading a file the bundle
// brings last does not wait for the bundle: through a 20 Mbit/s link the
// 30 MB before it would take 12 s, and the worker fetches the file's chunk
// from the registry's blob endpoint (a ranged GET served by distribution)
// instead. The assertion is on bytes and the worker's counters, not time.
func TestWorkerDemandFetch(t *testing.T) {
	requireRoot(t)
	const bigSize = 30 << 20
	spec := harness.ImageSpec{Name: "starlight-test/late:v1", Layers: []harness.Layer{
		harness.BusyboxLayer(),
		{
			{Name: "/big.bin", RandomSize: bigSize, RandomSeed: 7},
			{Name: "/zz-late.txt", Content: []byte("the last file of the bundle\n")},
		},
	}}
	ref, addr, link := pushBehindSlowLink(t, spec, "e2e/late:v1")
	node := harness.StartNodeWith(t, harness.WorkerOptions{Registries: []string{"http://" + addr}, Metrics: true})
	ctd, w := node.Containerd, node.Worker
	const ns = "demand"

	w.CLI(t, ns, "pull", "--plain-http", ref)
	var out string
	timed(t, "ctr run cat /zz-late.txt", func() {
		out = ctd.CtrNS(t, ns, "run", "--rm", "--snapshotter", "starlight", ref, uniqueID("late"), "cat", "/zz-late.txt")
	})
	p := w.Progress(t, ref, ns)
	fetches := w.Metric(t, `starlight_worker_demand_fetches_total{result="ok"}`)
	fetched := w.Metric(t, `starlight_worker_demand_bytes_total`)
	t.Logf("after the container ran: bundle %d/%d bytes; %v on-demand fetches brought %v bytes; link delivered %d bytes",
		p.BytesReceived, p.BytesTotal, fetches, fetched, link.Stats().BytesDown)

	if !strings.Contains(out, "the last file of the bundle") {
		t.Fatalf("container output %q", out)
	}
	if p.BytesReceived >= p.BytesTotal/2 {
		t.Errorf("the bundle had brought %d of %d bytes: the file could have come from the stream", p.BytesReceived, p.BytesTotal)
	}
	if fetches < 1 || fetched <= 0 {
		t.Errorf("no on-demand fetch recorded (fetches %v, bytes %v)", fetches, fetched)
	}
	// The rest still arrives through the bundle, and the image completes.
	w.CLI(t, ns, "pull", "--plain-http", "--wait", ref)
	if p := w.Progress(t, ref, ns); !p.Complete {
		t.Errorf("image not complete after the bundle: %+v", p)
	}
}

// pushBehindSlowLink pushes spec as repoTag to a new registry and puts a
// 50 ms, 20 Mbit/s link in front of it. It returns the image reference
// through the link, the link's address and the link.
func pushBehindSlowLink(t *testing.T, spec harness.ImageSpec, repoTag string) (ref, addr string, link *linkem.Link) {
	t.Helper()
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	docker := harness.SharedDockerd(t)
	img := harness.BuildImage(t, spec)
	repo, tag, _ := strings.Cut(repoTag, ":")
	docker.Push(t, img, reg.Addr+"/"+repoTag)
	reg.WaitReady(t, repo, tag)

	link = linkem.New(linkem.Profile{RTT: 50 * time.Millisecond, Bandwidth: 20_000_000})
	t.Cleanup(link.Stop)
	a, err := link.Proxy("127.0.0.1:0", reg.Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("link %s in front of the registry at %s", link.Profile(), a)
	return a.String() + "/" + repoTag, a.String(), link
}
