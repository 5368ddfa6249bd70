package remote

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/remotes/docker/config"
	"github.com/pelletier/go-toml"
)

// HostConfig is the simple per-host setting the worker config and the CLI
// flags give today.
type HostConfig struct {
	PlainHTTP bool // HTTP instead of HTTPS
	// Username and Password authenticate to the registry: HTTP Basic, or
	// to the token service of a Bearer challenge. A Password without a
	// Username is a long-lived (refresh) token.
	Username, Password string
}

// StaticHosts builds a docker.RegistryHosts from a lookup of per-host
// settings (nil: HTTPS without credentials everywhere). Every host has one
// endpoint, trusted with pull, resolve and push, at the host itself
// (registry-1.docker.io for docker.io). All hosts share one HTTP client
// (see UpdateClient for its timeouts). As with ConfigureHosts, every call
// makes a new Authorizer (token cache): a Client keeps it for as long as
// it works.
func StaticHosts(lookup func(host string) HostConfig) docker.RegistryHosts {
	if lookup == nil {
		lookup = func(string) HostConfig { return HostConfig{} }
	}
	client := newHTTPClient()
	// The Authorizer asks for the credentials of the endpoint's host.
	creds := func(host string) (string, string, error) {
		hc := endpointConfig(lookup, host)
		return hc.Username, hc.Password, nil
	}
	return func(host string) ([]docker.RegistryHost, error) {
		hc := lookup(host)
		e := docker.RegistryHost{
			Client:       client,
			Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(client), docker.WithAuthCreds(creds)),
			Host:         host,
			Scheme:       "https",
			Path:         "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve | docker.HostCapabilityPush,
		}
		if hc.PlainHTTP {
			e.Scheme = "http"
		}
		e.Host = ownEndpoint(host)
		return []docker.RegistryHost{e}, nil
	}
}

// dockerHubEndpoint is where containerd sends the requests of references
// on docker.io.
const dockerHubEndpoint = "registry-1.docker.io"

// ownEndpoint is the endpoint host of a registry host's own endpoint (not
// a mirror): the host itself, registry-1.docker.io for docker.io.
func ownEndpoint(host string) string {
	if host == "docker.io" {
		return dockerHubEndpoint
	}
	return host
}

// endpointConfig is lookup's setting for endpoint host: the credentials of
// a configuration for docker.io serve Docker Hub's endpoint.
func endpointConfig(lookup func(host string) HostConfig, endpoint string) HostConfig {
	hc := lookup(endpoint)
	if hc.Username == "" && hc.Password == "" && endpoint == dockerHubEndpoint {
		hc = lookup("docker.io")
	}
	return hc
}

// newHTTPClient returns the HTTP client of StaticHosts: a transport
// prepared by UpdateClient.
func newHTTPClient() *http.Client {
	c := &http.Client{Transport: &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		DialContext:         (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     90 * time.Second,
	}}
	UpdateClient(c) //nolint:errcheck // an *http.Transport
	return c
}

// UpdateClient sets the network timeouts of registry requests on c, whose
// transport must be an *http.Transport. It has the signature of
// containerd's config.UpdateClientFunc so that hosts.toml clients
// (config.HostOptions.UpdateClient) get them too. A registry plans a delta
// before it answers, hence the long response header timeout; there is no
// overall timeout, for a bundle streams as long as it takes.
func UpdateClient(c *http.Client) error {
	tr, ok := c.Transport.(*http.Transport)
	if !ok {
		return errors.New("registry client: the transport is not an *http.Transport")
	}
	tr.TLSHandshakeTimeout = 30 * time.Second
	tr.ResponseHeaderTimeout = 5 * time.Minute
	c.Timeout = 0
	return nil
}

// HostsOptions configure NewHosts.
type HostsOptions struct {
	// Dir is a containerd host configuration directory (containerd's
	// config_path, usually /etc/containerd/certs.d): the endpoints
	// (mirrors first, then server), TLS settings (ca, client,
	// skip_verify) and headers of host h are in Dir/h/hosts.toml (or
	// Dir/h_PORT_/hosts.toml, or Dir/_default/hosts.toml), or in the
	// Docker certs.d layout (*.crt, *.cert, *.key) of that directory.
	// Empty, or no directory for a host: the host's own endpoint.
	Dir string
	// Static gives the per-host settings of Starlight's own
	// configuration. PlainHTTP makes HTTP the scheme of the host's own
	// endpoint where hosts.toml names no server; Username and Password
	// come first when an endpoint host needs credentials.
	Static func(host string) HostConfig
	// StaticSource names Static's credentials in errors ("the worker
	// configuration").
	StaticSource string
	// Credentials is asked for an endpoint host that Static has no
	// credentials for (a docker config.json, see package dockerconfig).
	// nil: none.
	Credentials CredentialFunc
}

// Hosts is the registry host configuration of containerd's hosts.toml
// directories combined with Starlight's own settings and credential
// sources. Its Lookup is an Options.Hosts, its Version an
// Options.HostsVersion, its CredentialSource an Options.CredentialSource:
//
//	h := remote.NewHosts(opts)
//	c := remote.New(remote.Options{Hosts: h.Lookup, HostsVersion: h.Version,
//		CredentialSource: h.CredentialSource})
type Hosts struct {
	opts    HostsOptions
	hostDir func(string) (string, error)
	first   CredentialFunc // WithCredentials

	mu      sync.Mutex
	sources map[string]credentialSource // by endpoint host: the last lookup
}

type credentialSource struct {
	source string
	found  bool
}

// NewHosts returns the host configuration of opts.
func NewHosts(opts HostsOptions) *Hosts {
	h := &Hosts{opts: opts, sources: map[string]credentialSource{}}
	if opts.Dir != "" {
		h.hostDir = config.HostDirFromRoot(opts.Dir)
	}
	return h
}

// Lookup resolves host through containerd's config.ConfigureHosts: the
// endpoints of its hosts.toml, each with its own HTTP client (prepared by
// UpdateClient) and Authorizer, whose credentials come from Static, then
// Credentials. The host's own endpoint is HTTPS unless Static says plain
// HTTP (containerd's guess of HTTP for localhost does not apply). A TLS
// verification error of an endpoint names the CA files it trusts.
func (h *Hosts) Lookup(host string) ([]docker.RegistryHost, error) {
	scheme := "https"
	if h.opts.Static != nil && h.opts.Static(host).PlainHTTP {
		scheme = "http"
	}
	endpoints, err := config.ConfigureHosts(context.Background(), config.HostOptions{
		HostDir:       h.hostDir,
		Credentials:   h.credentials,
		DefaultScheme: scheme,
		UpdateClient:  UpdateClient,
	})(host)
	if err != nil {
		if h.opts.Dir != "" {
			return nil, fmt.Errorf("host configuration in %s: %w", h.opts.Dir, err)
		}
		return nil, err
	}
	cas := h.caFiles(host)
	for i := range endpoints {
		e := &endpoints[i]
		if e.Client == nil || e.Client.Transport == nil {
			continue
		}
		c := *e.Client
		c.Transport = &tlsErrorTransport{rt: c.Transport, trusted: cas.describe(e.Host)}
		e.Client = &c
	}
	return endpoints, nil
}

// Version changes when the host directory of host does (it appears or
// goes, a file in it changes): the host directory and the names, sizes
// and modification times of its files. A Client asks Lookup again then,
// so that an edit of hosts.toml applies without a restart, as in
// containerd.
func (h *Hosts) Version(host string) string {
	if h.hostDir == nil {
		return ""
	}
	dir, err := h.hostDir(host)
	if err != nil || dir == "" {
		return "-"
	}
	var b strings.Builder
	b.WriteString(dir)
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if info, err := e.Info(); err == nil {
			fmt.Fprintf(&b, "\x00%s %d %d", e.Name(), info.Size(), info.ModTime().UnixNano())
		}
	}
	return b.String()
}

// WithCredentials returns a Hosts whose endpoints ask first for
// credentials: the credentials of one pull, such as a Kubernetes pod's
// pull secret, which come before the worker's own sources as a
// PullImage's credentials come before containerd's CRI configuration.
// first answering an Empty Credential passes on to the usual sources. The
// returned Hosts builds its own HTTP clients and Authorizers: a Client
// over it shares no token with others.
func (h *Hosts) WithCredentials(first CredentialFunc) *Hosts {
	return &Hosts{opts: h.opts, hostDir: h.hostDir, first: first, sources: map[string]credentialSource{}}
}

// credentials is the Authorizer's lookup: WithCredentials', then Static's
// credentials, else Credentials'; the first source with credentials for
// host answers. It remembers the source for CredentialSource.
func (h *Hosts) credentials(host string) (string, string, error) {
	var looked []string
	for _, lookup := range []CredentialFunc{h.first, h.static, h.opts.Credentials} {
		if lookup == nil {
			continue
		}
		c, err := lookup(host)
		if err != nil {
			h.remember(host, credentialSource{source: c.Source})
			return "", "", &CredentialError{Host: host, Err: err}
		}
		if !c.Empty() {
			h.remember(host, credentialSource{source: c.Source, found: true})
			return c.Username, c.Secret, nil
		}
		if c.Source != "" {
			looked = append(looked, c.Source)
		}
	}
	h.remember(host, credentialSource{source: strings.Join(looked, " or ")})
	return "", "", nil
}

// static is Static's credentials of endpoint host as a CredentialFunc,
// from StaticSource.
func (h *Hosts) static(host string) (Credential, error) {
	c := Credential{Source: h.opts.StaticSource}
	if h.opts.Static != nil {
		hc := endpointConfig(h.opts.Static, host)
		c.Username, c.Secret = hc.Username, hc.Password
	}
	return c, nil
}

func (h *Hosts) remember(host string, s credentialSource) {
	h.mu.Lock()
	h.sources[host] = s
	h.mu.Unlock()
}

// CredentialSource names where the credentials of endpoint host came from
// when they were last looked up (found), or where they were looked for.
func (h *Hosts) CredentialSource(host string) (source string, found bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	s, ok := h.sources[host]
	if !ok {
		return "", false
	}
	return s.source, s.found
}

// caSet is the CA files that hosts.toml (or certs.d *.crt files) of one
// host gives each endpoint host.
type caSet struct {
	root  string              // HostsOptions.Dir
	host  string              // the host looked up
	dir   string              // its host directory, "" for none
	files map[string][]string // by endpoint host
}

func (s caSet) describe(endpoint string) string {
	switch {
	case len(s.files[endpoint]) > 0:
		return "the system roots and " + strings.Join(s.files[endpoint], ", ")
	case s.dir != "":
		return "the system roots only: " + s.dir + " gives " + endpoint + " no ca"
	case s.root != "":
		return "the system roots only: " + s.root + " has no directory for " + s.host
	}
	return "the system roots only"
}

// caFiles reads which CA files the host directory of host gives its
// endpoints, for error messages (containerd keeps its parse to itself).
// It reads what config.ConfigureHosts reads: hosts.toml's ca of every
// [host."URL"] and at the top level (for server, or the host itself), or
// the *.crt files of the directory without hosts.toml.
func (h *Hosts) caFiles(host string) caSet {
	if h.hostDir == nil {
		return caSet{}
	}
	dir, err := h.hostDir(host)
	if err != nil || dir == "" {
		return caSet{root: h.opts.Dir, host: host}
	}
	set := caSet{root: h.opts.Dir, host: host, dir: dir, files: map[string][]string{}}
	self := ownEndpoint(host)
	b, err := os.ReadFile(filepath.Join(dir, "hosts.toml"))
	var tree *toml.Tree
	if err == nil && len(b) > 0 {
		tree, err = toml.LoadBytes(b)
	}
	if err != nil || tree == nil {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if !e.IsDir() && strings.HasSuffix(e.Name(), ".crt") {
				set.files[self] = append(set.files[self], filepath.Join(dir, e.Name()))
			}
		}
		return set
	}
	ca := func(v any) []string {
		var files []string
		switch v := v.(type) {
		case string:
			files = []string{v}
		case []any:
			for _, f := range v {
				if s, ok := f.(string); ok {
					files = append(files, s)
				}
			}
		}
		for i, f := range files {
			if !filepath.IsAbs(f) {
				files[i] = filepath.Join(dir, f)
			}
		}
		return files
	}
	endpointHost := func(server string) string {
		if !strings.HasPrefix(server, "http") {
			server = "https://" + server
		}
		if u, err := url.Parse(server); err == nil {
			return u.Host
		}
		return ""
	}
	if hostsTree, ok := tree.Get("host").(*toml.Tree); ok {
		for _, k := range hostsTree.Keys() {
			if sub, ok := hostsTree.GetPath([]string{k}).(*toml.Tree); ok {
				set.files[endpointHost(k)] = ca(sub.Get("ca"))
			}
		}
	}
	root := self
	if server, ok := tree.Get("server").(string); ok && server != "" {
		root = endpointHost(server)
	}
	if files := ca(tree.Get("ca")); len(files) > 0 {
		set.files[root] = files
	}
	return set
}

// tlsErrorTransport adds to a certificate verification error which CAs
// the endpoint trusts.
type tlsErrorTransport struct {
	rt      http.RoundTripper
	trusted string
}

func (t *tlsErrorTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.rt.RoundTrip(req)
	if err != nil && isCertificateError(err) {
		err = fmt.Errorf("%w (trusted CAs: %s)", err, t.trusted)
	}
	return resp, err
}

func isCertificateError(err error) bool {
	var (
		unknown  x509.UnknownAuthorityError
		hostname x509.HostnameError
		invalid  x509.CertificateInvalidError
		verify   *tls.CertificateVerificationError
	)
	return errors.As(err, &unknown) || errors.As(err, &hostname) || errors.As(err, &invalid) || errors.As(err, &verify)
}
