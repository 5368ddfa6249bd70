package criproxy

import (
	"encoding/base64"
	"net/url"
	"strings"
	"sync"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/starlight-project/starlight/api/remote"
)

// Source names the credentials of a CRI pull in errors.
const Source = "the PullImage request (the pod's imagePullSecrets, crictl --creds)"

// Secrets holds the credentials of the CRI pulls in flight, by the image
// reference containerd records (NormalizeRef), in memory only. An entry
// lives while a PullImage of that reference runs: the Prepares of the pull
// happen then. What a pull needs later (resuming the bundle, on-demand
// reads) it keeps itself.
type Secrets struct {
	mu    sync.Mutex
	byRef map[string]*held
}

type held struct {
	auth *runtime.AuthConfig
	n    int // PullImages of the reference in flight
}

// NewSecrets returns an empty store.
func NewSecrets() *Secrets { return &Secrets{byRef: map[string]*held{}} }

// Hold keeps auth for ref until release is called. Two pulls of one
// reference at once: the later credentials are the ones looked up, and the
// entry goes with the last release.
func (s *Secrets) Hold(ref string, auth *runtime.AuthConfig) (release func()) {
	s.mu.Lock()
	h := s.byRef[ref]
	if h == nil {
		h = &held{}
		s.byRef[ref] = h
	}
	h.auth = auth
	h.n++
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			if h.n--; h.n == 0 && s.byRef[ref] == h {
				delete(s.byRef, ref)
			}
			s.mu.Unlock()
		})
	}
}

// Credentials returns the credential lookup of the CRI pull of ref (as
// containerd records it, e.g. the cri.image-ref label of a Prepare), if a
// PullImage of ref carrying credentials is in flight.
func (s *Secrets) Credentials(ref string) (remote.CredentialFunc, bool) {
	s.mu.Lock()
	h := s.byRef[ref]
	var auth *runtime.AuthConfig
	if h != nil {
		auth = h.auth
	}
	s.mu.Unlock()
	if auth == nil {
		return nil, false
	}
	// A copy: the request's message is not ours to keep.
	a := *auth
	return func(host string) (remote.Credential, error) { return parseAuth(&a, host), nil }, true
}

// authGiven tells whether a PullImage carries credentials.
func authGiven(a *runtime.AuthConfig) bool {
	return a != nil && (a.Username != "" || a.Password != "" || a.Auth != "" || a.IdentityToken != "" || a.RegistryToken != "")
}

// parseAuth is containerd's CRI ParseAuth: the credentials of auth for
// the endpoint host, none when auth names another server. A registry
// token (a bearer token for the registry itself) is passed as an identity
// token, the only kind of token containerd's Authorizer takes.
func parseAuth(a *runtime.AuthConfig, host string) remote.Credential {
	none := remote.Credential{Source: Source}
	if a.ServerAddress != "" && !sameHost(serverHost(a.ServerAddress), host) {
		return none
	}
	switch {
	case a.Username != "":
		return remote.Credential{Username: a.Username, Secret: a.Password, Source: Source}
	case a.IdentityToken != "":
		return remote.Credential{Secret: a.IdentityToken, Source: Source}
	case a.Auth != "":
		b, err := base64.StdEncoding.DecodeString(a.Auth)
		if err != nil {
			return none
		}
		user, pass, _ := strings.Cut(string(b), ":")
		return remote.Credential{Username: user, Secret: pass, Source: Source}
	case a.RegistryToken != "":
		return remote.Credential{Secret: a.RegistryToken, Source: Source}
	}
	return none
}

// serverHost is the host of a docker config key: "registry.example.com",
// "https://registry.example.com/v2/", "https://index.docker.io/v1/".
func serverHost(addr string) string {
	if !strings.Contains(addr, "://") {
		addr = "https://" + addr
	}
	u, err := url.Parse(addr)
	if err != nil {
		return addr
	}
	return u.Host
}

// sameHost compares registry hosts, Docker Hub's names being one.
func sameHost(a, b string) bool {
	hub := func(h string) string {
		switch h {
		case "docker.io", "index.docker.io", "registry-1.docker.io":
			return "docker.io"
		}
		return h
	}
	return hub(a) == hub(b)
}
