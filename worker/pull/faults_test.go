package pull

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
	"github.com/starlight-project/starlight/api/remote"
	"github.com/starlight-project/starlight/worker/config"
	"github.com/starlight-project/starlight/worker/internal/fakeregistry"
	"github.com/starlight-project/starlight/worker/layers"
	"github.com/starlight-project/starlight/worker/store"
)

// The worker's side of faults: what a pull does with a registry that
// breaks its streams, lies or sends garbage. The pulls here are the CRI
// kind (FetchCRI), which run the whole bundle path of a pull (request,
// header, trees, expected contents, frames, resumes) and leave containerd
// alone, so they need no containerd.

// testPuller is a Puller on a private store and layer registry, pulling
// from fake registries.
type testPuller struct {
	pl     *Puller
	store  *store.Store
	layers *layers.Registry
}

func newTestPuller(t *testing.T, retries int, limits bundle.Limits, hosts ...string) *testPuller {
	t.Helper()
	dir := t.TempDir()
	st, err := store.Open(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	ls, err := layers.Open(context.Background(), filepath.Join(dir, "layers"), st, noMount)
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.PullRetries = retries
	for _, h := range hosts {
		cfg.Registries = append(cfg.Registries, config.Registry{Host: h, PlainHTTP: true})
	}
	rc := remote.New(remote.Options{Hosts: remote.StaticHosts(func(string) remote.HostConfig {
		return remote.HostConfig{PlainHTTP: true}
	})})
	pl, err := New(cfg, Deps{
		Store: st, Layers: ls, Remote: rc, Metrics: NewMetrics(prometheus.NewRegistry()),
		RecordDir: filepath.Join(dir, "images"), Backoff: time.Millisecond, BundleLimits: limits,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pl.Close() })
	return &testPuller{pl: pl, store: st, layers: ls}
}

// pull fetches img from host as a CRI pull does and waits for the pull to
// end, complete or failed. It returns the image's final state.
func (tp *testPuller) pull(t *testing.T, host string, img *fakeregistry.Image) api.WorkerImage {
	t.Helper()
	ref := host + "/app:v1"
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// An error is a pull refused at its header; it ends as failed.
	ferr := tp.pl.FetchCRI(ctx, ref, img.ManifestDigest)
	tp.pl.mu.Lock()
	job := tp.pl.pulls[imageKey(criNamespace, ref)]
	tp.pl.mu.Unlock()
	for {
		st, changed := job.Snapshot()
		job.mu.Lock()
		active := job.active
		job.mu.Unlock()
		if !active {
			if ferr != nil && (st.State != api.PullFailed || !strings.Contains(st.Error, ferr.Error())) {
				t.Errorf("FetchCRI: %v, but the pull ended %s: %q", ferr, st.State, st.Error)
			}
			return st
		}
		select {
		case <-changed:
		case <-ctx.Done():
			t.Fatalf("the pull of %s did not end: %+v", ref, st)
		}
	}
}

// checkStore asserts that the store holds nothing unverified: every file
// of content/ hashes to its name, and no partial file is left behind by a
// pull that ended.
func (tp *testPuller) checkStore(t *testing.T) {
	t.Helper()
	root := tp.store.Root()
	err := filepath.WalkDir(filepath.Join(root, "content"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != d.Name() {
			t.Errorf("unverified content in the store: %s", p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	partial, err := os.ReadDir(filepath.Join(root, "partial"))
	if err != nil {
		t.Fatal(err)
	}
	for _, de := range partial {
		t.Errorf("partial file left after the pull: %s", de.Name())
	}
}

// checkContents asserts that every content of img is complete and reads
// exactly as the registry has it.
func (tp *testPuller) checkContents(t *testing.T, img *fakeregistry.Image) {
	t.Helper()
	for _, l := range img.Layers {
		for _, e := range l.Entries {
			if e.Digest == "" {
				continue
			}
			var want []byte
			for _, c := range e.Chunks {
				want = append(want, img.ChunkData[fakeregistry.MemberKey(e.Digest, c.Offset)]...)
			}
			p := make([]byte, len(want))
			if _, err := tp.store.ReadAt(context.Background(), digest.Digest(e.Digest), p, 0); err != nil || !bytes.Equal(p, want) {
				t.Errorf("%s: content %s does not read back as sent (%v)", e.Name, e.Digest, err)
			}
		}
	}
}

// faultImage is a small image of two layers, one with a file of three
// chunks, whose contents (and so digests) depend on name.
func faultImage(t *testing.T, name string) *fakeregistry.Image {
	t.Helper()
	big := bytes.Repeat([]byte(name+" big file\n"), 20000)[:150000]
	return fakeregistry.BuildImage(t, 64<<10,
		[]fakeregistry.File{
			{Name: "etc", Type: api.TypeDir, Mode: 0o755},
			{Name: "etc/hello.txt", Type: api.TypeReg, Mode: 0o644, Data: []byte("hello from " + name + "\n")},
			{Name: "etc/big", Type: api.TypeReg, Mode: 0o644, Data: big},
		},
		[]fakeregistry.File{{Name: "app.txt", Type: api.TypeReg, Mode: 0o644, Data: []byte("the app of " + name + "\n")}},
	)
}

func gzipped(t *testing.T, p []byte) []byte {
	t.Helper()
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	zw.Write(p)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// rawBundle is a stream of the given magic and (uncompressed) header JSON.
func rawBundle(t *testing.T, magic string, js string) []byte {
	z := gzipped(t, []byte(js))
	b := append([]byte(magic), make([]byte, 8)...)
	binary.BigEndian.PutUint64(b[8:], uint64(len(z)))
	return append(b, z...)
}

// headerEnd is where the frames of a bundle stream start.
func headerEnd(stream []byte) int { return 16 + int(binary.BigEndian.Uint64(stream[8:16])) }

// TestHostileRegistry: a registry that sends malformed headers, trees over
// the worker's limits, frames for contents it never listed, frames whose
// data does not match their digests, truncated frames and absurd sizes.
// The worker refuses each with an error that says what is wrong, keeps
// nothing unverified in its store, records no layer of a header it
// refused, and pulls a good image afterwards.
func TestHostileRegistry(t *testing.T) {
	const maxItems = 2000
	for _, tc := range []struct {
		name string
		// hostile edits the registry's answers; img is its image.
		hostile func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image)
		// want is in the pull's error.
		want string
		// headerRefused: nothing of the header may be recorded.
		headerRefused bool
	}{
		{"not a bundle", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			reg.EditStream = func([]byte) []byte { return []byte("<html><body>Welcome to nginx!</body></html>\n") }
		}, `bad magic "<html><b" (not a Starlight bundle)`, true},
		{"header length beyond the limit", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			reg.EditStream = func(s []byte) []byte { binary.BigEndian.PutUint64(s[8:16], 300<<20); return s }
		}, "header length 314572800 out of range (1 to 268435456 bytes)", true},
		{"header not gzip", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			reg.EditStream = func(s []byte) []byte { copy(s[16:], "garbage!"); return s }
		}, "header: gzip: invalid header", true},
		{"header JSON cut short", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			reg.EditStream = func([]byte) []byte { return rawBundle(t, "SLBNDL01", `{"version":1,"layers":[`) }
		}, "header: the JSON ends before it is complete", true},
		{"header of another version", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			reg.EditStream = func([]byte) []byte { return rawBundle(t, "SLBNDL01", `{"version":7}`) }
		}, "header version 7 in a version 1 stream", true},
		{"entry escaping the root", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			reg.EditHeader = func(h *api.BundleHeader) { h.Layers[0].Entries[1].Name = "../../etc/passwd" }
		}, `path "../../etc/passwd" escapes the layer root`, true},
		{"digest naming a path", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			reg.EditHeader = func(h *api.BundleHeader) { h.Layers[1].Digest = "sha256:../../../tmp/x" }
		}, `invalid digest "sha256:../../../tmp/x"`, true},
		{"manifest that is not its digest", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			reg.EditHeader = func(h *api.BundleHeader) { h.Manifest = []byte(`{"schemaVersion":2}`) }
		}, "manifest content has digest", true},
		{"tree over the worker's limit", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			reg.EditHeader = func(h *api.BundleHeader) {
				for i := range maxItems {
					h.Layers[1].Entries = append(h.Layers[1].Entries, api.Entry{Name: fmt.Sprintf("d%05d", i), Type: api.TypeDir, Mode: 0o755})
				}
			}
		}, fmt.Sprintf("more than %d JSON objects and arrays", maxItems), true},
		{"frame for a content no file has", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			data := []byte("a content the trees do not list")
			raw := gzipped(t, data)
			d := digest.FromBytes(data).String()
			reg.EditHeader = func(h *api.BundleHeader) {
				h.Frames = append([]api.Frame{{Digest: d, Size: int64(len(data)), ChunkDigest: d, CompressedSize: int64(len(raw))}}, h.Frames...)
			}
			reg.EditFrame = func(i int, f api.Frame, m []byte) []byte {
				if f.Digest == d {
					return raw
				}
				return m
			}
		}, "which no file of the trees has", true},
		{"frame outside its content", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			reg.EditHeader = func(h *api.BundleHeader) { h.Frames[0].Offset = 1 << 40 }
		}, "lie outside content", true},
		{"absurd frame size", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			reg.EditHeader = func(h *api.BundleHeader) { h.Frames[0].Size, h.Frames[0].CompressedSize = 1<<40, 1<<40 }
		}, "out of range (sizes 1 to 67108864 bytes)", true},
		{"absurd file size", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			reg.EditHeader = func(h *api.BundleHeader) {
				e := &h.Layers[1].Entries[0]
				e.Size = 1 << 62
				e.Chunks[0].Size = 1 << 62
			}
		}, "of its 4611686018427387904 bytes", true},
		{"chunk that does not match its digest", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			// The same number of bytes as the chunk, other ones.
			f0 := img.Header(nil).Frames[0]
			forged := gzipped(t, bytes.ToUpper(img.ChunkData[fakeregistry.MemberKey(f0.Digest, f0.Offset)]))
			reg.EditHeader = func(h *api.BundleHeader) { h.Frames[0].CompressedSize = int64(len(forged)) }
			reg.EditFrame = func(i int, f api.Frame, m []byte) []byte {
				if i == 0 {
					return forged
				}
				return m
			}
		}, "chunk digest mismatch", false},
		{"chunks of a content that is not its digest", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			// Every chunk verifies; the file they make up does not.
			lie := digest.FromString("not the digest of etc/big").String()
			big := img.Layers[0].Entries[2].Digest
			reg.EditHeader = func(h *api.BundleHeader) {
				h.Layers[0].Entries[2].Digest = lie
				for i := range h.Frames {
					if h.Frames[i].Digest == big {
						h.Frames[i].Digest = lie
					}
				}
			}
			reg.EditFrame = func(i int, f api.Frame, m []byte) []byte {
				if f.Digest == lie {
					return img.Members[fakeregistry.MemberKey(big, f.Offset)]
				}
				return m
			}
		}, "whole content has digest", false},
		{"frame that is not gzip", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			reg.EditFrame = func(i int, f api.Frame, m []byte) []byte {
				if i == 1 {
					return bytes.Repeat([]byte{'x'}, len(m))
				}
				return m
			}
		}, "gzip: invalid header", false},
		{"stream always cut in its last frame", func(t *testing.T, reg *fakeregistry.Registry, img *fakeregistry.Image) {
			reg.EditStream = func(s []byte) []byte { return s[:len(s)-5] }
		}, "bytes before the end of the frame: unexpected EOF", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := faultImage(t, tc.name)
			reg := &fakeregistry.Registry{Image: img, Refs: []string{"app@" + img.ManifestDigest.String()}}
			tc.hostile(t, reg, img)
			host := fakeregistry.Start(t, reg)
			good := faultImage(t, "good after "+tc.name)
			goodHost := fakeregistry.Start(t, &fakeregistry.Registry{Image: good, Refs: []string{"app@" + good.ManifestDigest.String()}})
			tp := newTestPuller(t, 2, bundle.Limits{HeaderItems: maxItems}, host, goodHost)

			st := tp.pull(t, host, img)
			t.Logf("%s: %s", st.State, st.Error)
			if st.State != api.PullFailed || !strings.Contains(st.Error, tc.want) {
				t.Errorf("pull ended %s with %q, want failed saying %q", st.State, st.Error, tc.want)
			}
			tp.checkStore(t)
			if tc.headerRefused {
				for _, l := range img.Layers {
					if tp.layers.Known(digest.Digest(l.Digest)) {
						t.Errorf("layer %s of a refused header was recorded", l.Digest)
					}
				}
				if n := tp.store.Pending(); n != 0 {
					t.Errorf("%d contents of a refused header expected", n)
				}
			}
			// The worker goes on: the next pull, of a good image, completes.
			if st := tp.pull(t, goodHost, good); st.State != api.PullComplete || !st.Complete || st.Error != "" {
				t.Fatalf("the good pull after it ended %s, complete=%t, %q", st.State, st.Complete, st.Error)
			}
			tp.checkContents(t, good)
			tp.checkStore(t)
		})
	}
}

// A stream that breaks after every frame is resumed at once each time
// (each brought a frame), however many times; only breaks in a row that
// bring nothing count toward pull_retries.
func TestResumeAfterProgressIsNotCounted(t *testing.T) {
	img := faultImage(t, "progress")
	reg := &fakeregistry.Registry{Image: img, Refs: []string{"app@" + img.ManifestDigest.String()}, BreakAfter: 1, AlwaysBreak: true}
	host := fakeregistry.Start(t, reg)
	tp := newTestPuller(t, 1, bundle.Limits{}, host)
	st := tp.pull(t, host, img)
	if st.State != api.PullComplete || !st.Complete {
		t.Fatalf("pull ended %s, complete=%t: %s", st.State, st.Complete, st.Error)
	}
	frames := len(img.Header(nil).Frames)
	if st.Resumes != frames-1 {
		t.Errorf("%d resumes for %d frames broken after each frame, want %d", st.Resumes, frames, frames-1)
	}
	tp.checkContents(t, img)
	tp.checkStore(t)
}

// A stream cut in its header, the first time it is asked for, is asked
// for again; it is not a reason to fail the pull.
func TestHeaderCutShortIsAskedAgain(t *testing.T) {
	img := faultImage(t, "header")
	var calls atomic.Int32
	reg := &fakeregistry.Registry{Image: img, Refs: []string{"app@" + img.ManifestDigest.String()}}
	reg.EditStream = func(s []byte) []byte {
		switch calls.Add(1) {
		case 1:
			return s[:10] // in the preamble
		case 2:
			return s[:headerEnd(s)-1] // one byte short of the header
		}
		return s
	}
	host := fakeregistry.Start(t, reg)
	tp := newTestPuller(t, 2, bundle.Limits{}, host)
	st := tp.pull(t, host, img)
	if st.State != api.PullComplete || !st.Complete || st.Resumes != 2 {
		t.Fatalf("pull ended %s, complete=%t, %d resumes: %s", st.State, st.Complete, st.Resumes, st.Error)
	}
	tp.checkContents(t, img)

	// Cut short more often in a row than pull_retries allows: the pull
	// fails, saying the stream was truncated.
	img2 := faultImage(t, "header always")
	reg2 := &fakeregistry.Registry{Image: img2, Refs: []string{"app@" + img2.ManifestDigest.String()},
		EditStream: func(s []byte) []byte { return s[:20] }}
	host2 := fakeregistry.Start(t, reg2)
	tp2 := newTestPuller(t, 2, bundle.Limits{}, host2)
	st = tp2.pull(t, host2, img2)
	if st.State != api.PullFailed || !strings.Contains(st.Error, "truncated bundle: the stream ended 4 bytes into its") {
		t.Fatalf("pull ended %s: %q", st.State, st.Error)
	}
	if n := len(reg2.Requests()); n != 3 {
		t.Errorf("%d requests, want 3 (pull_retries = 2)", n)
	}
}
