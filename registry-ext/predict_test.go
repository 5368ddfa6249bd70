package registryext

import (
	"archive/tar"
	"cmp"
	"context"
	"debug/elf"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
)

// hostFiles copies host files into tar entries as the host lays them out:
// each symlink on a path as a symlink with its own target, the file
// where the links lead (so /lib64/ld-linux-x86-64.so.2 on a usrmerged
// Debian is lib64 → usr/lib64, a symlink to /lib/x86_64-linux-gnu/…,
// lib → usr/lib and the loader under usr/lib/x86_64-linux-gnu).
func hostFiles(t *testing.T, paths ...string) []tarFile {
	t.Helper()
	var out []tarFile
	seen := map[string]bool{}
	add := func(f tarFile) {
		if !seen[f.name] {
			seen[f.name] = true
			out = append(out, f)
		}
	}
	var walk func(cur string, comps []string, depth int)
	walk = func(cur string, comps []string, depth int) {
		if depth > 40 {
			t.Fatalf("symlink loop on the host at %s", cur)
		}
		for i, c := range comps {
			if c == "" || c == "." {
				continue
			}
			next := filepath.Join(cur, c)
			fi, err := os.Lstat(next)
			if err != nil {
				t.Skipf("host file %s: %v", next, err)
			}
			name := strings.TrimPrefix(next, "/")
			switch {
			case fi.Mode()&fs.ModeSymlink != 0:
				target, err := os.Readlink(next)
				if err != nil {
					t.Fatal(err)
				}
				add(tarFile{name: name, typ: tar.TypeSymlink, link: target})
				base := cur
				if filepath.IsAbs(target) {
					base = "/"
				}
				walk(base, append(strings.Split(target, "/"), comps[i+1:]...), depth+1)
				return
			case fi.IsDir():
				add(tarFile{name: name + "/", typ: tar.TypeDir})
				cur = next
			default:
				body, err := os.ReadFile(next)
				if err != nil {
					t.Skipf("host file %s: %v", next, err)
				}
				add(tarFile{name: name, body: string(body), mode: 0o755})
				return
			}
		}
	}
	for _, p := range paths {
		walk("/", strings.Split(strings.TrimPrefix(filepath.Clean(p), "/"), "/"), 0)
	}
	return out
}

// hostReal names the host file p resolves to as the index does.
func hostReal(t *testing.T, p string) string {
	t.Helper()
	r, err := filepath.EvalSymlinks(p)
	if err != nil {
		t.Skipf("host file %s: %v", p, err)
	}
	return strings.TrimPrefix(r, "/")
}

// elfImage is an image whose entrypoint, found through PATH in the top
// layer, is the host's dynamic bash; the base layer holds its loader,
// libraries and the loader cache after filler files that layer order
// would send first. It needs a Debian-like amd64 host.
func elfImage(t *testing.T) *testImage {
	t.Helper()
	if runtime.GOARCH != "amd64" {
		t.Skip("the image is made of the host's amd64 binaries")
	}
	f, err := elf.Open("/usr/bin/bash")
	if err != nil {
		t.Skip(err)
	}
	libs, _ := f.ImportedLibraries()
	f.Close()
	if !slices.Equal(libs, []string{"libtinfo.so.6", "libc.so.6"}) {
		t.Skipf("host bash needs %v", libs)
	}
	var base []tarFile
	for i := range 5 {
		base = append(base, tarFile{name: "aaa/filler" + string(rune('0'+i)), body: strings.Repeat("filler ", 20000)})
	}
	base = append(base, hostFiles(t, "/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6",
		"/lib/x86_64-linux-gnu/libtinfo.so.6", "/etc/ld.so.cache")...)
	bash, err := os.ReadFile("/usr/bin/bash")
	if err != nil {
		t.Skip(err)
	}
	l1, d1 := tarLayer(t, base)
	l2, d2 := tarLayer(t, []tarFile{
		{name: "app/", typ: tar.TypeDir},
		{name: "app/data", body: "data"},
		{name: "usr/local/bin/bash", body: string(bash), mode: 0o755},
	})
	return buildImageConfig(t, [][]byte{l1, l2}, []digest.Digest{d1, d2}, ocispec.ImageConfig{
		Entrypoint: []string{"bash"}, Cmd: []string{"-c", "echo hello"},
		Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/bin:/bin"},
	})
}

// distinct is names in order of first appearance.
func distinct(names []string) []string {
	var out []string
	for _, n := range names {
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

func sortedFrames(h *api.BundleHeader) []api.Frame {
	fr := slices.Clone(h.Frames)
	slices.SortFunc(fr, func(a, b api.Frame) int {
		return cmp.Or(strings.Compare(a.Digest, b.Digest), cmp.Compare(a.Offset, b.Offset))
	})
	return fr
}

// TestPredictionOrdersUntracedBundle: an image nobody has run, whose
// entrypoint is a dynamic ELF program, is delivered ELF closure first:
// the program, its loader, the loader cache, its libraries, whole; with
// the same frames as without a prediction. A real trace then replaces the
// prediction.
func TestPredictionOrdersUntracedBundle(t *testing.T) {
	im := elfImage(t)
	ctx := context.Background()

	// Without prediction: layer order, the filler first.
	plain := newTestRegistry(t, registryConfig{options: map[string]any{"predict": false}})
	plain.push("library/bash", "v1", im)
	pst := plain.waitDone("library/bash", "v1")
	plainBundle := plain.bundleOf("library/bash:v1")
	if got := contentOrder(plainBundle); !strings.HasPrefix(got[0], "aaa/filler") {
		t.Fatalf("bundle without prediction starts with %v", got)
	}
	plain.close()

	r := newTestRegistry(t, registryConfig{})
	dgst := r.push("library/bash", "v1", im)
	st := r.waitDone("library/bash", "v1")
	if st.State != api.StateReady {
		t.Fatalf("conversion: %+v", st)
	}
	if st.ConvertedDigest != pst.ConvertedDigest {
		t.Fatalf("converted to %s, and to %s without prediction", st.ConvertedDigest, pst.ConvertedDigest)
	}
	// The prediction is stored before the job completes.
	r.waitJob("library/bash", dgst, "v1")
	items, err := r.ext().DB().PredictedPriority(ctx, "library/bash", st.ConvertedDigest)
	if err != nil || len(items) == 0 {
		t.Fatalf("no predicted priority (%v)", err)
	}
	if n, err := r.ext().DB().TraceCount(ctx, "library/bash", st.ConvertedDigest); err != nil || n != 1 {
		t.Errorf("%d traces (%v), want the prediction", n, err)
	}

	h := r.bundleOf("library/bash:v1")
	order := contentOrder(h)
	want := []string{"usr/local/bin/bash", hostReal(t, "/lib64/ld-linux-x86-64.so.2"), "etc/ld.so.cache",
		hostReal(t, "/lib/x86_64-linux-gnu/libtinfo.so.6"), hostReal(t, "/lib/x86_64-linux-gnu/libc.so.6")}
	t.Logf("bundle order: %v", distinct(order))
	if got := distinct(order); len(got) < len(want) || !slices.Equal(got[:len(want)], want) {
		t.Fatalf("predicted bundle starts with %v, want %v", got, want)
	}
	// Whole files: every frame of the closure comes before any other.
	for i, n := range order {
		if !slices.Contains(want, n) {
			for _, rest := range order[i:] {
				if slices.Contains(want, rest) {
					t.Errorf("a frame of %s after %s: %v", rest, n, order)
				}
			}
			break
		}
	}
	// A prediction changes the order, never the content.
	if !slices.EqualFunc(sortedFrames(h), sortedFrames(plainBundle), func(a, b api.Frame) bool { return a == b }) ||
		h.Stats != plainBundle.Stats {
		t.Errorf("frames or stats differ from the bundle without prediction: %+v vs %+v", h.Stats, plainBundle.Stats)
	}

	// The first real trace replaces the prediction.
	rep := api.TraceReport{Repository: "library/bash", ManifestDigest: st.ConvertedDigest, Worker: "w1", Container: "c1",
		StartedAt: time.Unix(1_700_000_000, 0), Accesses: []api.TraceAccess{access(t, h, "app/data", 1)}}
	if code, _, e := r.report(rep); code != http.StatusCreated {
		t.Fatalf("report: %d %+v", code, e)
	}
	got := contentOrder(r.bundleOf("library/bash:v1"))
	if got[0] != "app/data" || !strings.HasPrefix(got[1], "aaa/filler") {
		t.Errorf("traced bundle starts with %v, want app/data then layer order", got)
	}
	if items, err := r.ext().DB().PredictedPriority(ctx, "library/bash", st.ConvertedDigest); err != nil || len(items) != 0 {
		t.Errorf("predicted priority after a real trace: %d items (%v)", len(items), err)
	}
}
