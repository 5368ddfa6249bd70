package remote

import (
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/containerd/containerd/remotes/docker"
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
		hc := lookup(host)
		if hc.Username == "" && hc.Password == "" && host == "registry-1.docker.io" {
			hc = lookup("docker.io")
		}
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
		if host == "docker.io" {
			e.Host = "registry-1.docker.io"
		}
		return []docker.RegistryHost{e}, nil
	}
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
