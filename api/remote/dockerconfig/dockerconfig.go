// Package dockerconfig reads registry credentials from a docker
// config.json, as docker and containerd's clients (nerdctl, crictl's
// users) keep them: the auths entries (a base64 "user:password" auth, a
// username and password, or an identity token), and the credential
// helpers of credHelpers (per registry host) and credsStore (for every
// host), which are run as docker runs them: `docker-credential-NAME get`
// with the server address on standard input, answering
// {"Username": ..., "Secret": ...}.
//
// The file is read at every lookup, so that a `docker login` is seen
// without a restart; nothing is cached or written. Errors name the file or
// the helper, never a secret.
package dockerconfig

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strings"
	"time"

	"github.com/docker/docker-credential-helpers/client"
	"github.com/docker/docker-credential-helpers/credentials"

	"github.com/starlight-project/starlight/api/remote"
)

// DefaultHelperTimeout bounds one run of a credential helper.
const DefaultHelperTimeout = 30 * time.Second

// indexServer is the server address docker keeps Docker Hub's credentials
// under.
const indexServer = "https://index.docker.io/v1/"

// File is a docker config.json.
type File struct {
	// Path of the config.json; empty means DefaultPath().
	Path string
	// HelperTimeout bounds a credential helper run; 0 means
	// DefaultHelperTimeout.
	HelperTimeout time.Duration
}

// DefaultPath is where docker keeps its config: $DOCKER_CONFIG/config.json,
// else ~/.docker/config.json.
func DefaultPath() string {
	if d := os.Getenv("DOCKER_CONFIG"); d != "" {
		return filepath.Join(d, "config.json")
	}
	home, _ := os.UserHomeDir()
	if home == "" {
		if u, err := user.Current(); err == nil {
			home = u.HomeDir
		}
	}
	return filepath.Join(home, ".docker", "config.json")
}

// configFile is the part of config.json that holds credentials.
type configFile struct {
	Auths       map[string]authEntry `json:"auths"`
	CredsStore  string               `json:"credsStore"`
	CredHelpers map[string]string    `json:"credHelpers"`
}

type authEntry struct {
	Auth          string `json:"auth"`
	Username      string `json:"username"`
	Password      string `json:"password"`
	IdentityToken string `json:"identitytoken"`
}

func (f *File) path() string {
	if f.Path != "" {
		return f.Path
	}
	return DefaultPath()
}

// Credentials looks up the credentials of an endpoint host, as docker
// does: the helper of credHelpers for the host, else the credsStore
// helper, else the auths entry. A missing file, no entry, or a helper
// that has no credentials for the host is no credentials (anonymous);
// the Credential's Source then says where they were looked for. Docker
// Hub's hosts (docker.io, registry-1.docker.io, index.docker.io) are
// looked up as docker keeps them, under https://index.docker.io/v1/.
//
// It is a remote.CredentialFunc.
func (f *File) Credentials(host string) (remote.Credential, error) {
	path := f.path()
	none := remote.Credential{Source: path}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return none, nil
	}
	if err != nil {
		return none, fmt.Errorf("reading docker config: %w", err)
	}
	var cf configFile
	if len(bytes.TrimSpace(b)) > 0 {
		if err := json.Unmarshal(b, &cf); err != nil {
			// A JSON syntax error quotes no input, but a type
			// error may name a field: keep to the position.
			return none, fmt.Errorf("reading docker config %s: invalid JSON (%s)", path, jsonErrorKind(err))
		}
	}
	server := serverAddress(host)
	if name := lookupHelper(cf.CredHelpers, server); name != "" {
		return f.runHelper(name, server, fmt.Sprintf("docker-credential-%s (credHelpers in %s)", name, path))
	}
	if cf.CredsStore != "" {
		return f.runHelper(cf.CredsStore, server, fmt.Sprintf("docker-credential-%s (credsStore in %s)", cf.CredsStore, path))
	}
	e, ok := lookupAuth(cf.Auths, server)
	if !ok {
		return none, nil
	}
	c := remote.Credential{Username: e.Username, Secret: e.Password, Source: path}
	if e.Auth != "" {
		dec, err := base64.StdEncoding.DecodeString(strings.TrimSpace(e.Auth))
		if err != nil {
			return none, fmt.Errorf("%s: the auth of %s is not base64", path, server)
		}
		user, pass, ok := strings.Cut(string(dec), ":")
		if !ok {
			return none, fmt.Errorf("%s: the auth of %s is not user:password", path, server)
		}
		c.Username, c.Secret = user, pass
	}
	if e.IdentityToken != "" {
		// containerd's convention: a secret without a user is a
		// refresh token.
		c.Username, c.Secret = "", e.IdentityToken
	}
	if c.Empty() {
		return none, nil
	}
	return c, nil
}

func jsonErrorKind(err error) string {
	var syn *json.SyntaxError
	if errors.As(err, &syn) {
		return fmt.Sprintf("syntax error at byte %d", syn.Offset)
	}
	var typ *json.UnmarshalTypeError
	if errors.As(err, &typ) {
		return fmt.Sprintf("wrong type for %s", typ.Field)
	}
	return "cannot decode"
}

// serverAddress is the key docker keeps host's credentials under.
func serverAddress(host string) string {
	switch host {
	case "docker.io", "registry-1.docker.io", "index.docker.io":
		return indexServer
	}
	return host
}

// hostname reduces a config.json key ("https://registry.example.com/v2/")
// to its host, as docker's ConvertToHostname.
func hostname(key string) string {
	s := key
	if rest, ok := strings.CutPrefix(s, "https://"); ok {
		s = rest
	} else if rest, ok := strings.CutPrefix(s, "http://"); ok {
		s = rest
	}
	h, _, _ := strings.Cut(s, "/")
	return h
}

// matches tells whether a config.json key stands for server.
func matches(key, server string) bool {
	if key == server {
		return true
	}
	if server == indexServer {
		switch hostname(key) {
		case "index.docker.io", "docker.io", "registry-1.docker.io":
			return true
		}
		return false
	}
	return hostname(key) == server
}

func lookupHelper(helpers map[string]string, server string) string {
	if name, ok := helpers[server]; ok {
		return name
	}
	for k, name := range helpers {
		if matches(k, server) {
			return name
		}
	}
	return ""
}

func lookupAuth(auths map[string]authEntry, server string) (authEntry, bool) {
	if e, ok := auths[server]; ok {
		return e, true
	}
	for k, e := range auths {
		if matches(k, server) {
			return e, true
		}
	}
	return authEntry{}, false
}

// runHelper asks docker-credential-name for the credentials of server.
func (f *File) runHelper(name, server, source string) (remote.Credential, error) {
	none := remote.Credential{Source: source}
	bin, err := exec.LookPath("docker-credential-" + name)
	if err != nil {
		return none, fmt.Errorf("%s: the helper is not installed (not in $PATH)", source)
	}
	timeout := f.HelperTimeout
	if timeout <= 0 {
		timeout = DefaultHelperTimeout
	}
	creds, err := client.Get(func(args ...string) client.Program {
		return &program{bin: bin, args: args, timeout: timeout}
	}, server)
	if credentials.IsErrCredentialsNotFound(err) {
		return none, nil
	}
	if err != nil {
		return none, fmt.Errorf("%s: %w", source, err)
	}
	c := remote.Credential{Username: creds.Username, Secret: creds.Secret, Source: source}
	if c.Username == "<token>" {
		// docker's convention for an identity token.
		c.Username = ""
	}
	if c.Empty() {
		return none, nil
	}
	return c, nil
}

// program runs a credential helper with a deadline. Its standard error is
// dropped: the helper's error message comes on standard output.
type program struct {
	bin     string
	args    []string
	timeout time.Duration
	in      io.Reader
}

func (p *program) Input(in io.Reader) { p.in = in }

func (p *program) Output() ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), p.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, p.bin, p.args...)
	cmd.Stdin = p.in
	cmd.Stderr = io.Discard
	out, err := cmd.Output()
	if ctx.Err() != nil {
		return out, fmt.Errorf("no answer in %s", p.timeout)
	}
	return out, err
}
