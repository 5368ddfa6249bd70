package remote

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/starlight-project/starlight/api"
)

// RegistryError is an error answer of a registry.
type RegistryError struct {
	Status  int    // HTTP status
	Code    string // machine-readable code, if the registry gave one
	Message string
}

func (e *RegistryError) Error() string {
	if e.Code != "" {
		return fmt.Sprintf("registry: %s: %s", e.Code, e.Message)
	}
	return fmt.Sprintf("registry: HTTP %d: %s", e.Status, e.Message)
}

// readRegistryError reads and closes the body of an error answer. For a
// Starlight route (starlight), a 404 without an error code hints that the
// registry lacks the extension.
func readRegistryError(resp *http.Response, starlight bool) error {
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	e := &RegistryError{Status: resp.StatusCode}
	e.Code, e.Message = decodeError(b)
	if e.Message == "" {
		e.Message = resp.Status
	}
	if starlight && resp.StatusCode == http.StatusNotFound && e.Code == "" {
		e.Message += " (is this a Starlight registry?)"
	}
	return e
}

// decodeError reads the code and message of an error body: the JSON of the
// Starlight API (api.Error), distribution's {"errors": [...]}, or text.
// TODO: use api.ReadError once api/errors.go has it.
func decodeError(b []byte) (code, message string) {
	var ae api.Error
	if json.Unmarshal(b, &ae) == nil && ae.Message != "" {
		return ae.Code, ae.Message
	}
	var de struct {
		Errors []struct{ Code, Message string } `json:"errors"`
	}
	if json.Unmarshal(b, &de) == nil && len(de.Errors) > 0 {
		return de.Errors[0].Code, de.Errors[0].Message
	}
	return "", strings.TrimSpace(string(b))
}
