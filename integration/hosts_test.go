package integration

import (
	"encoding/base64"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/starlight-project/starlight/integration/harness"
)

// pushRunnable pushes a two-layer image (busybox, then /hello.txt holding
// text) to repo:tag over HTTP, without docker.
func pushRunnable(t *testing.T, reg *harness.Registry, repo, tag, text string) {
	t.Helper()
	var layers []harness.Descriptor
	var diffIDs []string
	for _, l := range []harness.Layer{harness.BusyboxLayer(), {{Name: "/hello.txt", Content: []byte(text)}}} {
		blob, diffID, err := harness.LayerBlob(l)
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, reg.PushBlob(t, repo, blob, harness.MediaTypeLayerGzip))
		diffIDs = append(diffIDs, diffID)
	}
	reg.PushLayers(t, repo, tag, layers, diffIDs)
}

// writeHostsTOML writes containerd's dir/<hostdir>/hosts.toml.
func writeHostsTOML(t *testing.T, dir, hostDir, content string) {
	t.Helper()
	d := filepath.Join(dir, hostDir)
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

// credHelperScript is a docker credential helper that knows one server's
// credentials and logs every call.
const credHelperScript = `#!/bin/sh
read -r server
echo "$1 $server" >> "%s"
if [ "$1" = get ] && [ "$server" = "%s" ]; then
	printf '{"ServerURL":"%%s","Username":"%s","Secret":"%s"}\n' "$server"
	exit 0
fi
echo "credentials not found in native keychain"
exit 1
`

// TestWorkerHostsTLSAuth is the acceptance test of registry access the way
// containerd does it: a starlight-registry behind TLS (a CA of the test's
// own) and htpasswd auth, and a worker whose config holds neither
// credentials nor CA. The CA comes from a containerd hosts.toml directory,
// the credentials from a docker config.json (DOCKER_CONFIG): an auths
// entry for one name of the registry (127.0.0.1:PORT), a credential helper
// (credHelpers) for the other (localhost:PORT). Wrong credentials fail the
// pull with one error naming the host and the config.json, a missing CA
// with an error naming the CAs trusted; no secret reaches the worker's
// log. Edits of config.json and the hosts directory apply without a
// restart.
func TestWorkerHostsTLSAuth(t *testing.T) {
	requireRoot(t)
	const user, password, wrongPassword = "alice", "wonderland-7731", "not-the-password-4410"
	ca := harness.NewCA(t)
	reg := harness.StartRegistry(t, harness.RegistryOptions{TLS: ca, Htpasswd: map[string]string{user: password}})
	const repo, tag = "e2e/hosts-tls", "v1"
	pushRunnable(t, reg, repo, tag, "hello over TLS\n")
	reg.WaitReady(t, repo, tag)
	_, port, _ := net.SplitHostPort(reg.Addr)
	ipHost, nameHost := reg.Addr, "localhost:"+port

	// The CA at the top level of one hosts.toml, in a [host] section of
	// the other (in containerd's host_PORT_ directory form).
	hostsDir := harness.ShortTempDir(t, "certsd-")
	writeHostsTOML(t, hostsDir, ipHost, fmt.Sprintf("server = \"https://%s\"\nca = %q\n", ipHost, ca.CAFile))

	dockerDir := harness.ShortTempDir(t, "docker-")
	binDir := filepath.Join(dockerDir, "bin")
	if err := os.Mkdir(binDir, 0o755); err != nil {
		t.Fatal(err)
	}
	helperLog := filepath.Join(dockerDir, "helper.log")
	writeFile(t, filepath.Join(binDir, "docker-credential-sltest"), fmt.Sprintf(credHelperScript, helperLog, nameHost, user, password), 0o755)
	configJSON := filepath.Join(dockerDir, "config.json")
	writeConfig := func(pass string) {
		auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
		writeFile(t, configJSON, fmt.Sprintf(`{"auths": {%q: {"auth": %q}}, "credHelpers": {%q: "sltest"}}`, ipHost, auth, nameHost), 0o600)
	}
	writeConfig(wrongPassword)

	node := harness.StartNodeWith(t, harness.WorkerOptions{
		Registries: []string{"https://" + ipHost, "https://" + nameHost},
		Args:       []string{"--hosts-dir", hostsDir},
		Env:        []string{"DOCKER_CONFIG=" + dockerDir, "PATH=" + binDir + ":" + os.Getenv("PATH")},
	})
	ctd, w := node.Containerd, node.Worker
	const ns = "hosts"
	run := func(ref string) {
		t.Helper()
		out := ctd.CtrNS(t, ns, "run", "--rm", "--snapshotter", "starlight", ref, uniqueID("hosts"), "cat", "/hello.txt")
		mustContain(t, "container of "+ref, out, "hello over TLS")
	}

	ipRef := ipHost + "/" + repo + ":" + tag
	out, err := w.CLIE(ns, "pull", ipRef)
	t.Logf("pull with a wrong password: %v", err)
	wrongOut := out
	want := ipHost + ": authentication failed with credentials from " + configJSON
	if err == nil || !strings.Contains(out, want) {
		t.Fatalf("pull with a wrong password: %v, want an error containing %q", err, want)
	}
	if n := strings.Count(out, "authentication failed"); n != 1 {
		t.Errorf("the error says %d times that authentication failed, want once:\n%s", n, out)
	}

	// ctr's --user: the pull's own credentials come first, and a refusal
	// names them.
	out, err = w.CLIE(ns, "pull", "--user", user+":"+wrongPassword, ipRef)
	if want := ipHost + ": authentication failed with credentials from --user"; err == nil || !strings.Contains(out, want) {
		t.Fatalf("pull --user with a wrong password: %v, want an error containing %q:\n%s", err, want, out)
	}
	timed(t, "pull --user", func() { w.CLI(t, ns, "pull", "--user", user+":"+password, ipRef) })
	run(ipRef)

	// Without a hosts.toml, the system roots do not know the CA; the
	// hosts.toml written then applies without a restart.
	nameRef := nameHost + "/" + repo + ":" + tag
	out, err = w.CLIE(ns, "pull", nameRef)
	t.Logf("pull without the CA: %v", err)
	if err == nil || !strings.Contains(out, "x509") || !strings.Contains(out, "trusted CAs: the system roots only: "+hostsDir+" has no directory for "+nameHost) {
		t.Fatalf("pull without the CA: %v, want an x509 error naming the CAs trusted", err)
	}
	writeHostsTOML(t, hostsDir, "localhost_"+port+"_", fmt.Sprintf("[host.\"https://%s\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n  ca = [%q]\n", nameHost, ca.CAFile))
	timed(t, "pull with the credential helper", func() { w.CLI(t, ns, "pull", nameRef) })
	run(nameRef)
	calls, _ := os.ReadFile(helperLog)
	if !strings.Contains(string(calls), "get "+nameHost) {
		t.Errorf("the credential helper was not asked for %s: %q", nameHost, calls)
	}

	// docker login: the file is read again, the failed credentials are
	// not kept.
	writeConfig(password)
	timed(t, "pull with config.json auths", func() { w.CLI(t, ns, "pull", ipRef) })
	run(ipRef)

	log, err := os.ReadFile(filepath.Join(w.Dir, "worker.log"))
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{password, wrongPassword, base64.StdEncoding.EncodeToString([]byte(user + ":" + password))} {
		if strings.Contains(string(log), secret) || strings.Contains(wrongOut, secret) {
			t.Errorf("a secret (%q) is in the worker log or the CLI output", secret)
		}
	}
}

// TestWorkerHostsMirror checks hosts.toml mirrors: the image is named by
// an upstream registry that is down; the hosts.toml of its host lists a
// server that is no Starlight registry (404 on everything), then a second
// starlight-registry with the same image, over plain HTTP. The worker
// pulls and runs the image from the second mirror, and logs once that the
// first is no Starlight registry (once, for two pulls).
func TestWorkerHostsMirror(t *testing.T) {
	requireRoot(t)
	upstream := harness.StartRegistry(t, harness.RegistryOptions{})
	mirror := harness.StartRegistry(t, harness.RegistryOptions{})
	const repo, tag = "e2e/hosts-mirror", "v1"
	for _, reg := range []*harness.Registry{upstream, mirror} {
		pushRunnable(t, reg, repo, tag, "hello from a mirror\n")
		reg.WaitReady(t, repo, tag)
	}
	// A second tag, for a second pull.
	pushRunnable(t, mirror, repo, "v2", "hello again from a mirror\n")
	mirror.WaitReady(t, repo, "v2")
	var mu sync.Mutex
	var notStarlight []string
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		notStarlight = append(notStarlight, r.Method+" "+r.URL.Path)
		mu.Unlock()
		http.NotFound(w, r)
	}))
	defer plain.Close()
	// The second mirror, behind a proxy that counts its bundle requests.
	var mirrorDeltas int
	target, err := url.Parse(mirror.URL)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.FlushInterval = -1
	counted := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.URL.Path == "/starlight/delta" {
			mu.Lock()
			mirrorDeltas++
			mu.Unlock()
		}
		rp.ServeHTTP(w, r)
	}))
	defer counted.Close()

	hostsDir := harness.ShortTempDir(t, "certsd-")
	writeHostsTOML(t, hostsDir, upstream.Addr, fmt.Sprintf(`server = %q

[host.%q]
  capabilities = ["pull", "resolve"]

[host.%q]
  capabilities = ["pull", "resolve"]
`, upstream.URL, plain.URL, counted.URL))
	upstream.Stop()
	if resp, err := http.Get(upstream.URL + "/v2/"); err == nil {
		resp.Body.Close()
		t.Fatalf("the upstream still answers: %s", resp.Status)
	}

	node := harness.StartNodeWith(t, harness.WorkerOptions{
		Registries: []string{upstream.URL},
		Args:       []string{"--hosts-dir", hostsDir},
	})
	ctd, w := node.Containerd, node.Worker
	const ns = "mirror"
	ref := upstream.Addr + "/" + repo + ":" + tag
	timed(t, "pull through the mirrors", func() { w.CLI(t, ns, "pull", ref) })
	out := ctd.CtrNS(t, ns, "run", "--rm", "--snapshotter", "starlight", ref, uniqueID("mirror"), "cat", "/hello.txt")
	mustContain(t, "container from the mirror", out, "hello from a mirror")
	ref2 := upstream.Addr + "/" + repo + ":v2"
	w.CLI(t, ns, "pull", ref2)
	out = ctd.CtrNS(t, ns, "run", "--rm", "--snapshotter", "starlight", ref2, uniqueID("mirror"), "cat", "/hello.txt")
	mustContain(t, "second container from the mirror", out, "hello again from a mirror")

	mu.Lock()
	seen := strings.Join(notStarlight, "\n")
	deltas := mirrorDeltas
	mu.Unlock()
	if strings.Count(seen, "POST /starlight/delta") < 2 {
		t.Errorf("the first mirror was not asked for both bundles; it saw:\n%s", seen)
	}
	if deltas != 2 {
		t.Errorf("the second mirror served %d bundles, want 2", deltas)
	}
	log, err := os.ReadFile(filepath.Join(w.Dir, "worker.log"))
	if err != nil {
		t.Fatal(err)
	}
	plainHost := strings.TrimPrefix(plain.URL, "http://")
	if n := strings.Count(string(log), "registry endpoint "+plainHost+" of "+upstream.Addr+" is not a Starlight registry"); n != 1 {
		t.Errorf("the worker logged %d times that %s is no Starlight registry, want once", n, plainHost)
	}
}
