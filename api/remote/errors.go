package remote

import (
	"fmt"
	"net/http"

	"github.com/starlight-project/starlight/api"
)

// RegistryError is an error answer of a registry.
type RegistryError struct {
	Status  int           // HTTP status
	Code    api.ErrorCode // machine-readable code, if the registry gave one
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
	ae := api.ReadError(resp)
	e := &RegistryError{Status: resp.StatusCode, Code: ae.Code, Message: ae.Message}
	if starlight && resp.StatusCode == http.StatusNotFound && e.Code == "" {
		e.Message += " (is this a Starlight registry?)"
	}
	return e
}
