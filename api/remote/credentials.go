package remote

import (
	"errors"
	"fmt"

	"github.com/containerd/containerd/remotes/docker"
	remoteserrors "github.com/containerd/containerd/remotes/errors"
)

// Credential is what a credential source holds for a registry host.
type Credential struct {
	// Username and Secret: a password, or with an empty Username an
	// identity (refresh) token.
	Username, Secret string
	// Source names where the credentials come from, or with none where
	// they were looked for: "/root/.docker/config.json",
	// "docker-credential-pass (credsStore in /root/.docker/config.json)".
	// It is for messages and never holds a secret.
	Source string
}

// Empty tells that c holds no credentials.
func (c Credential) Empty() bool { return c.Username == "" && c.Secret == "" }

// CredentialFunc looks up the credentials of an endpoint host
// ("registry.example.com", "127.0.0.1:5000", "registry-1.docker.io"). No
// credentials is an Empty Credential (with the Source looked in) and a nil
// error; an error is a source that failed, and names it.
type CredentialFunc func(host string) (Credential, error)

// AuthError is a registry endpoint that refused the credentials of a
// request, or that asked for credentials where no source has any.
type AuthError struct {
	Host string // the endpoint host, as credentials are looked up
	// Source names where the credentials came from; with Found false,
	// where they were looked for ("": unknown).
	Source string
	Found  bool
	Err    error // the registry's answer, or the authorizer's error
}

func (e *AuthError) Error() string {
	switch {
	case e.Found:
		return fmt.Sprintf("%s: authentication failed with credentials from %s: %v", e.Host, e.Source, e.Err)
	case e.Source != "":
		return fmt.Sprintf("%s: authentication required, and there are no credentials for it in %s: %v", e.Host, e.Source, e.Err)
	default:
		return fmt.Sprintf("%s: authentication failed: %v", e.Host, e.Err)
	}
}

func (e *AuthError) Unwrap() error { return e.Err }

// CredentialError is a credential source that failed (a helper that is not
// installed or crashed, an unreadable config.json). Its message names the
// source, never a secret.
type CredentialError struct {
	Host string
	Err  error
}

func (e *CredentialError) Error() string {
	return fmt.Sprintf("%s: looking up credentials: %v", e.Host, e.Err)
}

func (e *CredentialError) Unwrap() error { return e.Err }

// authError wraps err, an authentication failure of endpoint host.
func (c *Client) authError(host string, err error) error {
	var ce *CredentialError
	if errors.As(err, &ce) {
		return ce
	}
	ae := &AuthError{Host: host, Err: err}
	if c.opts.CredentialSource != nil {
		ae.Source, ae.Found = c.opts.CredentialSource(host)
	}
	return ae
}

// isAuthFailure tells whether an error of Authorizer.Authorize is a
// refusal of the credentials (a token service that answers 401 or 403),
// not a token service that cannot be reached.
func isAuthFailure(err error) bool {
	var status remoteserrors.ErrUnexpectedStatus
	if errors.As(err, &status) {
		return status.StatusCode == 401 || status.StatusCode == 403
	}
	return errors.Is(err, docker.ErrInvalidAuthorization)
}
