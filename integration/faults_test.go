package integration

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/integration/harness"
)

// The worker under faults, end to end: a bundle torn again and again on
// its way from the real registry, and a worker store whose disk fills up.
// The hostile registry (malformed headers, lying frames) is
// worker/pull's TestHostileRegistry, on the worker's test registry: the
// real one cannot be made to lie.

// pushFiles pushes an image of layers (no base: nothing runs, its files
// are read back through the snapshotter) as repo:tag and waits until it
// is converted.
func pushFiles(t *testing.T, reg *harness.Registry, repo, tag string, layers ...harness.Layer) {
	t.Helper()
	var descs []harness.Descriptor
	var diffIDs []string
	for i, l := range layers {
		blob, diffID, err := harness.LayerBlob(l)
		if err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
		descs = append(descs, reg.PushBlob(t, repo, blob, harness.MediaTypeLayerGzip))
		diffIDs = append(diffIDs, diffID)
	}
	reg.PushLayers(t, repo, tag, descs, diffIDs)
	reg.WaitReady(t, repo, tag)
}

// fileCheck is what reading every file of layers under root gave: files
// that read exactly as pushed, files whose read failed, and files that
// read other bytes (corrupt: must never happen).
type fileCheck struct {
	ok, failed int
	corrupt    []string
	failure    error // one of the failed reads
}

func checkFiles(t *testing.T, root string, layers ...harness.Layer) fileCheck {
	t.Helper()
	var c fileCheck
	for _, l := range layers {
		for _, e := range l {
			if e.Type != 0 && e.Type != tar.TypeReg {
				continue
			}
			want, err := e.SHA256()
			if err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(filepath.Join(root, e.Name))
			if err != nil {
				t.Fatalf("%s: %v", e.Name, err)
			}
			h := sha256.New()
			_, err = io.Copy(h, f)
			f.Close()
			switch {
			case err != nil:
				c.failed++
				c.failure = fmt.Errorf("%s: %w", e.Name, err)
			case hex.EncodeToString(h.Sum(nil)) != want:
				c.corrupt = append(c.corrupt, e.Name)
			default:
				c.ok++
			}
		}
	}
	return c
}

// checkStoreVerified asserts that every file of the worker's content store
// is the content its name says, and that no partial file is left.
func checkStoreVerified(t *testing.T, w *harness.Worker, partialsAllowed bool) int {
	t.Helper()
	store := filepath.Join(w.Root, "store")
	n := 0
	err := filepath.WalkDir(filepath.Join(store, "content"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if len(d.Name()) != 64 {
			return nil // a content's short second name (store.DataPath)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != d.Name() {
			t.Errorf("the store holds %s, which is not that content", p)
		}
		n++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !partialsAllowed {
		partial, err := os.ReadDir(filepath.Join(store, "partial"))
		if err != nil {
			t.Fatal(err)
		}
		for _, de := range partial {
			t.Errorf("partial file left after the pull: %s", de.Name())
		}
	}
	return n
}

// tornImage is 1,500 incompressible files of 2 to 24 KiB (one frame
// each) and four of 2.5 MiB (1 MiB frames): about 27 MB in 1,512 frames.
func tornImage() harness.Layer {
	l := harness.Layer{{Name: "/data", Type: tar.TypeDir}, {Name: "/big", Type: tar.TypeDir}}
	for i := range 1500 {
		l = append(l, harness.Entry{Name: fmt.Sprintf("/data/f%04d", i), RandomSize: int64(2+(i*37)%23) << 10, RandomSeed: uint64(50000 + i)})
	}
	for i := range 4 {
		l = append(l, harness.Entry{Name: fmt.Sprintf("/big/b%d", i), RandomSize: 5 << 19, RandomSeed: uint64(60000 + i)})
	}
	return l
}

// TestBundleTornAt100Places tears one pull's bundle 100 times, at random
// places (a proxy between the worker and the real registry cuts the
// connection there): twice in the header (the preamble, then the middle of
// the compressed header) and 98 times in as many frames, each at a random
// byte of it. The pull completes by itself, every file of the image reads
// back exactly as pushed, and the bytes sent again are at most the parts
// of the frames each cut interrupted: at most one frame per cut.
//
// Cuts fall in distinct frames, so that every resumed stream brings a
// frame and is resumed at once; a stream that brings nothing is resumed
// after a backoff (1 s, doubling) like a registry that is down, which the
// two header cuts exercise.
//
// STARLIGHT_TEAR_SEED picks other places (the seed is logged).
func TestBundleTornAt100Places(t *testing.T) {
	requireRoot(t)
	seed := uint64(12)
	if s := os.Getenv("STARLIGHT_TEAR_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("STARLIGHT_TEAR_SEED: %v", err)
		}
		seed = v
	}
	const headerCuts, frameCuts = 2, 98
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	layer := tornImage()
	const repo, tag = "e2e/torn", "v1"
	timed(t, "push and convert", func() { pushFiles(t, reg, repo, tag, layer) })

	var planned []int64
	maxFrame := int64(0)
	proxy := harness.StartTearProxy(t, reg.URL, func(h *api.BundleHeader, headerSize int64) []int64 {
		rng := rand.New(rand.NewPCG(seed, 0))
		cuts := []int64{rng.Int64N(16), 16 + rng.Int64N(headerSize-16)}
		// Not frame 0: a stream cut in its first frame brings nothing.
		starts := make([]int64, len(h.Frames))
		at := headerSize
		for i, f := range h.Frames {
			starts[i] = at
			at += f.CompressedSize
			maxFrame = max(maxFrame, f.CompressedSize)
		}
		for _, i := range rng.Perm(len(h.Frames) - 1)[:frameCuts] {
			f := h.Frames[i+1]
			cuts = append(cuts, starts[i+1]+rng.Int64N(f.CompressedSize))
		}
		planned = cuts
		return cuts
	})
	t.Logf("seed %d; tear proxy %s in front of the registry %s", seed, proxy.Addr, reg.Addr)

	node := harness.StartNodeWith(t, harness.WorkerOptions{Registries: []string{proxy.URL}, LogLevel: "info"})
	ctd, w := node.Containerd, node.Worker
	const ns = "torn"
	ref := proxy.Addr + "/" + repo + ":" + tag
	timed(t, "ctr-starlight pull --wait through 100 cuts", func() { w.CLI(t, ns, "pull", "--plain-http", "--wait", ref) })

	p := w.Progress(t, ref, ns)
	st := proxy.Stats()
	var interrupted int64
	for _, c := range st.Cuts {
		if c.Frame >= 0 {
			interrupted += c.Into
		}
	}
	resent := st.FrameBytes - p.BytesTotal
	t.Logf("bundle: %d frames, %d bytes of frames (largest %d), header %d bytes; %d streams, %d cuts; "+
		"%d frame bytes through the proxy: %d sent again (the cuts interrupted %d), %d header bytes; worker: %d resumes",
		p.FramesTotal, p.BytesTotal, maxFrame, st.HeaderBytes/int64(st.Streams), st.Streams, len(st.Cuts),
		st.FrameBytes, resent, interrupted, st.HeaderBytes, p.Resumes)
	if !p.Complete || p.Error != "" || p.BytesReceived != p.BytesTotal {
		t.Fatalf("the pull did not complete: %+v", p)
	}
	if len(st.Cuts) != headerCuts+frameCuts || proxy.Remaining() != 0 || len(planned) != headerCuts+frameCuts {
		t.Fatalf("%d cuts made, %d planned, %d not made: %v", len(st.Cuts), len(planned), proxy.Remaining(), st.Cuts)
	}
	if p.Resumes != len(st.Cuts) || st.Streams != len(st.Cuts)+1 {
		t.Errorf("%d cuts, but the worker resumed %d times in %d streams", len(st.Cuts), p.Resumes, st.Streams)
	}
	// The stream after a cut starts with the frame it interrupted, or the
	// next one when what the cut left out was only the member's tail (the
	// gzip trailer, eStargz's next tar header): the chunk was whole.
	tails := 0
	for i, c := range st.Cuts {
		if c.Frame < 0 || i+1 >= len(st.Resumes) {
			continue
		}
		switch st.Resumes[i+1] {
		case c.Frame:
		case c.Frame + 1:
			tails++
		default:
			t.Errorf("cut %d %s: the next stream starts at frame %d", i, c, st.Resumes[i+1])
		}
	}
	t.Logf("%d cuts left only a member's tail out: their chunk was whole, and not asked again", tails)
	if resent > interrupted {
		t.Errorf("%d frame bytes sent again, the cuts interrupted %d: the worker asked again for frames it had", resent, interrupted)
	}
	if bound := int64(len(st.Cuts)) * maxFrame; resent > bound {
		t.Errorf("%d bytes sent again, more than one frame per cut (%d cuts × %d)", resent, len(st.Cuts), bound)
	}

	stored := checkStoreVerified(t, w, false)
	root := ctd.MountImage(t, ns, "starlight", ref)
	c := checkFiles(t, root, layer)
	t.Logf("%d files read back as pushed, %d failed, %d corrupt; %d verified contents in the store", c.ok, c.failed, len(c.corrupt), stored)
	if len(c.corrupt) > 0 || c.failed > 0 || c.ok != len(layer)-2 {
		t.Fatalf("%d files corrupt (%v), %d failed (%v)", len(c.corrupt), c.corrupt, c.failed, c.failure)
	}
}

// TestWorkerStoreFull fills the disk of the worker's store (a 6 MiB tmpfs
// mounted as <root>/store) with a 15 MB image: the pull fails at once
// with an error that names the store and ENOSPC, what arrived reads back
// exactly, what did not fails to read (EIO) instead of reading wrong
// bytes, and the store holds only verified contents. Once the disk has
// space again, the same pull completes.
func TestWorkerStoreFull(t *testing.T) {
	requireRoot(t)
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	layer := harness.Layer{{Name: "/data", Type: tar.TypeDir}, {Name: "/data/hello.txt", Content: []byte("hello\n")}}
	for i := range 30 {
		layer = append(layer, harness.Entry{Name: fmt.Sprintf("/data/f%02d", i), RandomSize: 512 << 10, RandomSeed: uint64(70000 + i)})
	}
	const repo, tag = "e2e/full", "v1"
	pushFiles(t, reg, repo, tag, layer)

	root := filepath.Join(harness.ShortTempDir(t, "full-"), "root")
	store := filepath.Join(root, "store")
	if err := os.MkdirAll(store, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", store, "tmpfs", 0, "size=6m"); err != nil {
		t.Fatalf("mounting a tmpfs on the store: %v", err)
	}
	// Registered before the worker: runs after the worker stopped. The
	// worker's own cleanup may have unmounted it already.
	t.Cleanup(func() {
		if err := unix.Unmount(store, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			t.Errorf("unmounting %s: %v", store, err)
		}
	})
	node := harness.StartNodeWith(t, harness.WorkerOptions{Registries: []string{reg.URL}, Root: root, LogLevel: "info"})
	ctd, w := node.Containerd, node.Worker
	const ns = "full"
	ref := reg.Addr + "/" + repo + ":" + tag

	out, err := w.CLIE(ns, "pull", "--plain-http", "--wait", ref)
	t.Logf("pull on a full disk: %v", err)
	if err == nil {
		t.Fatalf("15 MB fit in a 6 MiB store: %s", out)
	}
	for _, want := range []string{"ENOSPC", "no space left on device", store} {
		if !strings.Contains(out, want) {
			t.Errorf("the pull's error does not say %q: %s", want, out)
		}
	}
	if p := w.Progress(t, ref, ns); p.State != api.PullFailed || p.Complete || !strings.Contains(p.Error, "ENOSPC") || p.Resumes != 0 {
		t.Errorf("image state after the full disk: %+v (want failed, not resumed)", p)
	}
	stored := checkStoreVerified(t, w, false)
	c := checkFiles(t, ctd.MountImage(t, ns, "starlight", ref), layer)
	t.Logf("on the full disk: %d files read back as pushed, %d failed to read (%v), %d corrupt; %d verified contents in the store",
		c.ok, c.failed, c.failure, len(c.corrupt), stored)
	if len(c.corrupt) > 0 {
		t.Errorf("files read other bytes than pushed: %v", c.corrupt)
	}
	if c.failed == 0 || !errors.Is(c.failure, unix.EIO) {
		t.Errorf("%d reads failed (%v): the contents that did not fit must fail with EIO", c.failed, c.failure)
	}

	// Space again: the same pull completes.
	if err := unix.Mount("tmpfs", store, "tmpfs", unix.MS_REMOUNT, "size=64m"); err != nil {
		t.Fatal(err)
	}
	w.CLI(t, ns, "pull", "--plain-http", "--wait", ref)
	if p := w.Progress(t, ref, ns); !p.Complete || p.Error != "" {
		t.Fatalf("not complete once space came back: %+v", p)
	}
	checkStoreVerified(t, w, false)
	c = checkFiles(t, ctd.MountImage(t, ns, "starlight", ref), layer)
	if len(c.corrupt) > 0 || c.failed > 0 || c.ok != len(layer)-1 {
		t.Fatalf("after space came back: %d files read as pushed, %d corrupt (%v), %d failed (%v)", c.ok, len(c.corrupt), c.corrupt, c.failed, c.failure)
	}
}
