package integration

import (
	"net/http"
	"strings"
	"testing"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/integration/harness"
)

// TestRegistryConvertsPushedImage is the acceptance test of the registry:
// a real `docker push` of a multi-layer image is converted, the converted
// tag runs with plain containerd (overlayfs, runc) exactly like the
// original, a broken image fails with a reason while the registry keeps
// serving.
func TestRegistryConvertsPushedImage(t *testing.T) {
	requireRoot(t)
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	docker := harness.SharedDockerd(t)
	spec := harness.TrickyImage("starlight-test/tricky:v1")
	img := harness.BuildImage(t, spec)

	const repo, tag = "e2e/tricky", "v1"
	ref := reg.Addr + "/" + repo + ":" + tag
	timed(t, "docker push", func() { docker.Push(t, img, ref) })

	var st api.ImageStatus
	timed(t, "conversion", func() { st = reg.WaitReady(t, repo, tag) })
	t.Logf("status: %+v", st)
	if st.ConvertedTag != tag+"-starlight" {
		t.Errorf("converted tag %q, want %q", st.ConvertedTag, tag+"-starlight")
	}
	if st.Layers != len(spec.Layers) {
		t.Errorf("status reports %d layers, want %d", st.Layers, len(spec.Layers))
	}
	if st.Files == 0 {
		t.Error("status reports no files")
	}
	converted := ref + "-starlight"
	if d, err := reg.ManifestDigest(repo, tag+"-starlight"); err != nil || d != st.ConvertedDigest {
		t.Errorf("converted tag resolves to %q (%v), status says %q", d, err, st.ConvertedDigest)
	}
	if d, err := reg.ManifestDigest(repo, tag); err != nil || d != st.Digest {
		t.Errorf("pushed tag resolves to %q (%v), status says %q", d, err, st.Digest)
	}
	// The status API answers by digest as well.
	if byDigest, _, err := reg.Status(repo, st.Digest); err != nil || byDigest.State != api.StateReady {
		t.Errorf("status by digest: %+v, %v", byDigest, err)
	}

	ctd := harness.StartContainerd(t, harness.ContainerdOptions{})
	const ns = "plain"
	timed(t, "ctr pull original", func() { ctd.CtrNS(t, ns, "images", "pull", "--plain-http", ref) })
	timed(t, "ctr pull converted", func() { ctd.CtrNS(t, ns, "images", "pull", "--plain-http", converted) })

	run := func(image string) string {
		return ctd.CtrNS(t, ns, "run", "--rm", "--snapshotter", "overlayfs", image, uniqueID("reg"), "/bin/sh", "-c", probeScript(true))
	}
	orig := run(ref)
	conv := run(converted)
	mustContain(t, "original image", orig, expectedProbe(t, spec)...)
	if orig != conv {
		t.Errorf("the converted image prints something else than the original:\n--- original\n%s\n--- converted\n%s", orig, conv)
	}

	t.Run("rootfs equivalence", func(t *testing.T) {
		a := ctd.MountImage(t, ns, "overlayfs", ref)
		b := ctd.MountImage(t, ns, "overlayfs", converted)
		diff, err := harness.CompareTrees(a, b, harness.CompareOptions{IgnoreRoot: harness.EStargzRootFiles})
		if err != nil {
			t.Fatal(err)
		}
		if diff != "" {
			t.Errorf("converted rootfs differs from the original (A=original, B=converted):\n%s", diff)
		}
	})

	t.Run("broken layer", func(t *testing.T) {
		const brokenRepo = "e2e/broken"
		garbage := []byte(strings.Repeat("this is neither gzip nor tar\n", 100))
		layer := reg.PushBlob(t, brokenRepo, garbage, harness.MediaTypeLayerGzip)
		pushed := reg.PushLayers(t, brokenRepo, "v1", []harness.Descriptor{layer}, []string{harness.Digest(garbage)})
		st := reg.WaitDone(t, brokenRepo, "v1")
		t.Logf("broken image status: %+v", st)
		if st.State != api.StateFailed {
			t.Fatalf("state %q, want %q", st.State, api.StateFailed)
		}
		if st.Error == "" {
			t.Error("failed without a reason")
		}
		// The registry keeps serving: /v2/, the broken original, the good image.
		if resp, _, err := reg.Get("/v2/", false); err != nil || resp.StatusCode != http.StatusOK {
			t.Errorf("GET /v2/ after a failed conversion: %v %v", resp, err)
		}
		if d, err := reg.ManifestDigest(brokenRepo, "v1"); err != nil || d != pushed {
			t.Errorf("the broken original is not served untouched: %q, %v (pushed %s)", d, err, pushed)
		}
		ctd.CtrNS(t, "after-broken", "images", "pull", "--plain-http", converted)
		out := ctd.CtrNS(t, "after-broken", "run", "--rm", "--snapshotter", "overlayfs", converted, uniqueID("reg"), "cat", "/small.txt")
		mustContain(t, "pull after a failed conversion", out, "small file at the root")
	})

	t.Run("malformed status requests", func(t *testing.T) {
		for _, path := range []string{
			harness.StatusPath("e2e/tricky", "no-such-tag"),
			harness.StatusPath("e2e/tricky", "sha256:nothex"),
			harness.StatusPath("UPPER/Case", "v1"),
		} {
			resp, body, err := reg.Get(path, false)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode < 400 || resp.StatusCode >= 500 {
				t.Errorf("GET %s: %s, want a 4xx", path, resp.Status)
			}
			if !strings.Contains(resp.Header.Get("Content-Type"), "json") {
				t.Errorf("GET %s: Content-Type %q, want JSON: %s", path, resp.Header.Get("Content-Type"), body)
			}
		}
	})
}

// TestRegistryAuth checks that with htpasswd auth configured the
// /starlight/ routes require the same credentials as /v2/.
func TestRegistryAuth(t *testing.T) {
	requireRoot(t)
	reg := harness.StartRegistry(t, harness.RegistryOptions{Htpasswd: map[string]string{"alice": "wonderland"}})
	blob, diffID, err := harness.LayerBlob(harness.Layer{{Name: "/hello.txt", Content: []byte("hello\n")}})
	if err != nil {
		t.Fatal(err)
	}
	const repo = "e2e/auth"
	layer := reg.PushBlob(t, repo, blob, harness.MediaTypeLayerGzip)
	reg.PushLayers(t, repo, "v1", []harness.Descriptor{layer}, []string{diffID})
	st := reg.WaitReady(t, repo, "v1")
	t.Logf("status with credentials: %+v", st)

	for _, tc := range []struct {
		name       string
		user, pass string
		want       int
	}{
		{"no credentials", "", "", http.StatusUnauthorized},
		{"wrong password", "alice", "nope", http.StatusUnauthorized},
		{"unknown user", "bob", "wonderland", http.StatusUnauthorized},
		{"valid credentials", "alice", "wonderland", http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, path := range []string{"/v2/", harness.StatusPath(repo, "v1")} {
				req, _ := http.NewRequest(http.MethodGet, reg.URL+path, nil)
				if tc.user != "" {
					req.SetBasicAuth(tc.user, tc.pass)
				}
				resp, body, err := reg.Do(req, false)
				if err != nil {
					t.Fatal(err)
				}
				if resp.StatusCode != tc.want {
					t.Errorf("GET %s: %s, want %d: %s", path, resp.Status, tc.want, body)
				}
			}
		})
	}
}
