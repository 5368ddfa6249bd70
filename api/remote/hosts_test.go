package remote

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"

	"github.com/starlight-project/starlight/api"
)

// startTLSFake serves f over HTTPS with a certificate for 127.0.0.1 of a
// CA of its own, and returns its host and the CA's PEM file.
func startTLSFake(t *testing.T, f *fakeRegistry) (host, caFile string) {
	f.t = t
	f.srv = httptest.NewUnstartedServer(f)
	cert, caPEM := newCA(t)
	f.srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	f.srv.StartTLS()
	t.Cleanup(f.srv.Close)
	caFile = filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, caPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return strings.TrimPrefix(f.srv.URL, "https://"), caFile
}

// newCA makes a CA and a server certificate it signs for 127.0.0.1.
func newCA(t *testing.T) (tls.Certificate, []byte) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key},
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
}

// writeHostsTOML writes dir/<host>/hosts.toml.
func writeHostsTOML(t *testing.T, dir, host, content string) {
	t.Helper()
	d := filepath.Join(dir, host)
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// staticCreds is a CredentialFunc that answers the same credentials for
// every host, from source "test-source".
func staticCreds(user, secret string) CredentialFunc {
	return func(string) (Credential, error) {
		return Credential{Username: user, Secret: secret, Source: "test-source"}, nil
	}
}

func hostsClient(o HostsOptions) *Client {
	h := NewHosts(o)
	return New(Options{Hosts: h.Lookup, HostsVersion: h.Version, CredentialSource: h.CredentialSource})
}

// A hosts.toml gives the CA of a TLS registry and a header; credentials
// come from the credential function; errors name host and source.
func TestHostsTOMLCAAndCredentials(t *testing.T) {
	f := &fakeRegistry{user: "bob", pass: "pw"}
	host, ca := startTLSFake(t, f)
	dir := t.TempDir()
	writeHostsTOML(t, dir, host, fmt.Sprintf(`server = "https://%s"
ca = %q
[header]
  X-Test = "from-hosts-toml"
`, host, ca))
	var gotHeader string
	f.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotHeader = r.Header.Get("X-Test")
		f.ServeHTTP(w, r)
	})

	c := hostsClient(HostsOptions{Dir: dir, StaticSource: "the worker configuration", Credentials: staticCreds("bob", "pw")})
	if b := delta(t, c, host); b != "bundle bytes" {
		t.Fatalf("body %q", b)
	}
	if gotHeader != "from-hosts-toml" {
		t.Fatalf("X-Test header %q", gotHeader)
	}

	_, err := hostsClient(HostsOptions{Dir: dir, Credentials: staticCreds("bob", "wrong")}).
		Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"})
	var ae *AuthError
	if want := host + ": authentication failed with credentials from test-source"; err == nil || !strings.Contains(err.Error(), want) || !errors.As(err, &ae) {
		t.Fatalf("error %v, want an AuthError containing %q", err, want)
	}
	if strings.Contains(err.Error(), "wrong") {
		t.Fatalf("the error shows the password: %v", err)
	}

	_, err = hostsClient(HostsOptions{Dir: dir, StaticSource: "the worker configuration", Credentials: staticCreds("", "")}).
		Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"})
	if want := host + ": authentication required, and there are no credentials for it in the worker configuration or test-source"; err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("error %v, want one containing %q", err, want)
	}

	// Static credentials come first.
	c = hostsClient(HostsOptions{Dir: dir, StaticSource: "the worker configuration", Credentials: staticCreds("bob", "wrong"),
		Static: func(string) HostConfig { return HostConfig{Username: "bob", Password: "pw"} }})
	if b := delta(t, c, host); b != "bundle bytes" {
		t.Fatalf("body %q", b)
	}
	_, err = hostsClient(HostsOptions{Dir: dir, StaticSource: "the worker configuration", Credentials: staticCreds("bob", "pw"),
		Static: func(string) HostConfig { return HostConfig{Username: "bob", Password: "nope"} }}).
		Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"})
	if want := "authentication failed with credentials from the worker configuration"; err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("error %v, want one containing %q", err, want)
	}

	// A failing source is named.
	_, err = hostsClient(HostsOptions{Dir: dir, Credentials: func(string) (Credential, error) {
		return Credential{Source: "helper-x"}, errors.New("helper-x: not installed")
	}}).Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"})
	var ce *CredentialError
	if err == nil || !errors.As(err, &ce) || !strings.Contains(err.Error(), host+": looking up credentials: helper-x: not installed") {
		t.Fatalf("error %v, want a CredentialError", err)
	}
}

// A certificate error names the CA files the endpoint trusts.
func TestHostsTLSErrorNamesCA(t *testing.T) {
	host, _ := startTLSFake(t, &fakeRegistry{})
	other, otherCA := startTLSFake(t, &fakeRegistry{}) // a CA that does not verify host

	dir := t.TempDir()
	// One client throughout: it sees the edits of the directory.
	c := hostsClient(HostsOptions{Dir: dir})
	_, err := c.Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"})
	if err == nil || !strings.Contains(err.Error(), "x509") || !strings.Contains(err.Error(), "trusted CAs: the system roots only: "+dir+" has no directory for "+host) {
		t.Fatalf("error %v, want an x509 error naming the system roots", err)
	}

	writeHostsTOML(t, dir, host, fmt.Sprintf("[host.\"https://%s\"]\n  ca = [%q]\n", host, otherCA))
	_, err = c.Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"})
	if err == nil || !strings.Contains(err.Error(), "trusted CAs: the system roots and "+otherCA) {
		t.Fatalf("error %v, want an x509 error naming %s", err, otherCA)
	}

	// The Docker certs.d layout: *.crt files, relative to the directory.
	d := filepath.Join(dir, hostDirName(other))
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(otherCA)
	if err := os.WriteFile(filepath.Join(d, "ca.crt"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if b := delta(t, c, other); b != "bundle bytes" {
		t.Fatalf("body %q", b)
	}
	// Unchanged, the host keeps its endpoints (connections, tokens).
	first, _ := c.Hosts()(other)
	again, _ := c.Hosts()(other)
	if first[0].Client != again[0].Client {
		t.Fatal("the endpoints of an unchanged host were made again")
	}
}

// hostDirName is containerd's directory name of a host with a port.
func hostDirName(host string) string {
	i := strings.LastIndex(host, ":")
	return host[:i] + "_" + host[i+1:] + "_"
}

// Without a hosts directory, Static's plain HTTP applies; WithPlainHTTP
// turns the host's own endpoint to HTTP but leaves mirrors alone.
func TestHostsPlainHTTP(t *testing.T) {
	host := startFake(t, &fakeRegistry{})
	c := hostsClient(HostsOptions{Static: func(string) HostConfig { return HostConfig{PlainHTTP: true} }})
	if b := delta(t, c, host); b != "bundle bytes" {
		t.Fatalf("body %q", b)
	}
	// HTTPS by default, also for localhost (no guessing HTTP).
	c = hostsClient(HostsOptions{Dir: t.TempDir()})
	if _, err := c.Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"}); err == nil {
		t.Fatal("HTTPS to an HTTP server worked")
	}
	if b := delta(t, c.WithPlainHTTP(), host); b != "bundle bytes" {
		t.Fatalf("body %q", b)
	}

	tlsMirror := &fakeRegistry{}
	mirrorHost, ca := startTLSFake(t, tlsMirror)
	dir := t.TempDir()
	writeHostsTOML(t, dir, "registry.example.com", fmt.Sprintf("server = \"https://registry.example.com\"\n[host.\"https://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = %q\n", mirrorHost, ca))
	c = hostsClient(HostsOptions{Dir: dir}).WithPlainHTTP()
	endpoints, err := c.Hosts()("registry.example.com")
	if err != nil {
		t.Fatal(err)
	}
	if len(endpoints) != 2 || endpoints[0].Scheme != "https" || endpoints[0].Host != mirrorHost || endpoints[1].Scheme != "http" || endpoints[1].Host != "registry.example.com" {
		t.Fatalf("endpoints %+v", endpoints)
	}
	if b := delta(t, c, "registry.example.com"); b != "bundle bytes" {
		t.Fatalf("body %q", b)
	}
}

// syncBuffer is a log output tests read while requests run.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A hosts.toml mirror that is not a Starlight registry passes Starlight
// requests to the next endpoint, and is logged once, not per request.
func TestHostsMirrorNotStarlight(t *testing.T) {
	var plainHits int
	var mu sync.Mutex
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		plainHits++
		mu.Unlock()
		http.NotFound(w, r)
	}))
	defer plain.Close()
	upstream := &fakeRegistry{user: "bob", pass: "pw"}
	upstreamHost := startFake(t, upstream)
	dir := t.TempDir()
	writeHostsTOML(t, dir, "registry.example.com", fmt.Sprintf(`server = "http://%s"
[host."%s"]
  capabilities = ["pull", "resolve"]
`, upstreamHost, plain.URL))

	var out syncBuffer
	logger := logrus.New()
	logger.SetOutput(&out)
	ctx := log.WithLogger(context.Background(), logrus.NewEntry(logger))
	c := hostsClient(HostsOptions{Dir: dir, Credentials: func(h string) (Credential, error) {
		if h != upstreamHost {
			return Credential{}, fmt.Errorf("credentials asked for %s", h)
		}
		return Credential{Username: "bob", Secret: "pw", Source: "s"}, nil
	}})
	for range 3 {
		body, err := c.Delta(ctx, "registry.example.com", "team/app", api.DeltaRequest{Reference: "team/app:v1"})
		if err != nil {
			t.Fatal(err)
		}
		body.Close()
	}
	plainHost := strings.TrimPrefix(plain.URL, "http://")
	if n := strings.Count(out.String(), "is not a Starlight registry"); n != 1 || !strings.Contains(out.String(), plainHost) {
		t.Fatalf("%d warnings, want 1 naming %s:\n%s", n, plainHost, out.String())
	}
	if plainHits != 3 {
		t.Fatalf("the mirror saw %d requests, want 3", plainHits)
	}
}

// The credentials of one pull (WithCredentials) come before the worker's
// own; an empty answer passes on to them; errors name the pull's source.
func TestHostsWithCredentials(t *testing.T) {
	f := &fakeRegistry{user: "bob", pass: "pw"}
	host, ca := startTLSFake(t, f)
	dir := t.TempDir()
	writeHostsTOML(t, dir, host, fmt.Sprintf("server = \"https://%s\"\nca = %q\n", host, ca))
	base := NewHosts(HostsOptions{Dir: dir, StaticSource: "the worker configuration",
		Static: func(string) HostConfig { return HostConfig{Username: "bob", Password: "stale"} }})
	client := func(h *Hosts) *Client {
		return New(Options{Hosts: h.Lookup, HostsVersion: h.Version, CredentialSource: h.CredentialSource})
	}
	pod := func(user, secret string) CredentialFunc {
		return func(string) (Credential, error) {
			return Credential{Username: user, Secret: secret, Source: "the pod"}, nil
		}
	}

	if b := delta(t, client(base.WithCredentials(pod("bob", "pw"))), host); b != "bundle bytes" {
		t.Fatalf("body %q", b)
	}
	_, err := client(base.WithCredentials(pod("bob", "wrong"))).
		Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"})
	if want := host + ": authentication failed with credentials from the pod"; err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("error %v, want one containing %q", err, want)
	}
	// No credentials for this host in the pull's: the worker's own apply
	// (here stale ones).
	_, err = client(base.WithCredentials(pod("", ""))).
		Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"})
	if want := "authentication failed with credentials from the worker configuration"; err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("error %v, want one containing %q", err, want)
	}
	// The base Hosts is unchanged.
	if _, err := client(base).Delta(context.Background(), host, "team/app", api.DeltaRequest{Reference: "team/app:v1"}); err == nil {
		t.Fatal("the worker's stale credentials were accepted")
	}
}
