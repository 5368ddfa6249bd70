package integration

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/starlight-project/starlight/integration/harness"
	"github.com/starlight-project/starlight/worker/pull"
)

// TestPullPlatform pushes a two-platform image index (linux/amd64 and
// linux/arm64; the image of the host's architecture runs, the other only
// holds files): `ctr-starlight pull --platform linux/arm64` gets the
// converted arm64 manifest, a pull without --platform the host's, and the
// image records (worker API, `ctr-starlight images`, containerd) say so.
// `ctr-starlight create` without -a then creates the container in the
// containerd the worker uses.
func TestPullPlatform(t *testing.T) {
	requireRoot(t)
	host := pull.DefaultPlatform
	reg := harness.StartRegistry(t, harness.RegistryOptions{})
	const repo, tag = "e2e/multi", "v1"
	var manifests []harness.Descriptor
	for _, arch := range []string{"amd64", "arm64"} {
		files := harness.Layer{{Name: "/etc/platform", Content: []byte("linux/" + arch + "\n")}}
		layers := []harness.Layer{files}
		if host.OS == "linux" && host.Architecture == arch {
			layers = []harness.Layer{harness.BusyboxLayer(), files}
		}
		manifests = append(manifests, reg.PushPlatformImage(t, repo, harness.Platform{OS: "linux", Architecture: arch}, layers))
	}
	reg.PushIndex(t, repo, tag, manifests)
	st := reg.WaitReady(t, repo, tag)

	// The converted index names the converted manifest of each platform.
	resp, body, err := reg.Get("/v2/"+repo+"/manifests/"+st.ConvertedTag, false)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("converted index %s: %v %v %s", st.ConvertedTag, resp, err, body)
	}
	var conv struct{ Manifests []harness.Descriptor }
	if err := json.Unmarshal(body, &conv); err != nil || len(conv.Manifests) != 2 {
		t.Fatalf("converted index: %v %s", err, body)
	}
	converted := map[string]string{} // platform → converted manifest digest
	for i, m := range conv.Manifests {
		if m.Platform == nil || m.Digest == manifests[i].Digest {
			t.Fatalf("converted index entry %d: %+v", i, m)
		}
		converted[m.Platform.OS+"/"+m.Platform.Architecture] = m.Digest
	}

	node := harness.StartNode(t, reg.URL)
	ctd, w := node.Containerd, node.Worker
	ref := reg.Addr + "/" + repo + ":" + tag

	t.Run("arm64", func(t *testing.T) {
		const ns = "arm"
		timed(t, "ctr-starlight pull --platform linux/arm64", func() {
			w.CLI(t, ns, "pull", "--plain-http", "--wait", "--platform", "linux/arm64", ref)
		})
		img := w.Progress(t, ref, ns)
		if img.Digest != converted["linux/arm64"] || img.Platform != "linux/arm64" || !img.Complete {
			t.Errorf("image record %+v, want digest %s, platform linux/arm64", img, converted["linux/arm64"])
		}
		out := w.CLI(t, ns, "images")
		mustContain(t, "ctr-starlight images", out, ref, "linux/arm64", converted["linux/arm64"][:19])
		out = ctd.CtrNS(t, ns, "images", "ls")
		mustContain(t, "ctr images ls", out, ref, converted["linux/arm64"])
		// arm64/v8 is the same platform.
		w.CLI(t, ns+"8", "pull", "--plain-http", "--platform", "linux/arm64/v8", ref)
		if img := w.Progress(t, ref, ns+"8"); img.Digest != converted["linux/arm64"] {
			t.Errorf("--platform linux/arm64/v8 pulled %s, want %s", img.Digest, converted["linux/arm64"])
		}
	})

	t.Run("default is the host's", func(t *testing.T) {
		want, ok := converted[host.String()]
		if !ok {
			t.Skipf("the host's platform %s is not in the index", host)
		}
		const ns = "host"
		w.CLI(t, ns, "pull", "--plain-http", ref)
		if img := w.Progress(t, ref, ns); img.Digest != want || img.Platform != host.String() {
			t.Errorf("default pull: image record %+v, want digest %s, platform %s", img, want, host)
		}

		// create without -a (and without CONTAINERD_ADDRESS) asks the
		// worker which containerd to use: the node's.
		t.Setenv("CONTAINERD_ADDRESS", "")
		id := uniqueID("noaddr")
		out := w.CLI(t, ns, "create", ref, id, "--", "cat", "/etc/platform")
		mustContain(t, "ctr-starlight create without -a", out, id)
		defer ctd.CtrNSE(ns, "containers", "rm", id)
		out = ctd.CtrNS(t, ns, "tasks", "start", id)
		mustContain(t, "container of the host's image", out, host.String())
	})

	t.Run("errors", func(t *testing.T) {
		for _, tc := range []struct{ platform, want string }{
			{"linux/arm64/v8/x", "invalid platform"},
			{"linux/s390x", "no linux/s390x manifest"},
		} {
			out, err := w.CLIE("errors", "pull", "--plain-http", "--platform", tc.platform, ref)
			if err == nil || !strings.Contains(out, tc.want) {
				t.Errorf("pull --platform %s: %v, output %q, want %q", tc.platform, err, out, tc.want)
			}
		}
	})
}
