package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
)

// ErrorCode is the machine-readable code of an Error. The codes are part
// of the wire contract of the /starlight/ routes (docs/BUNDLE.md §2):
// clients switch on them, so a code is never renamed or reused.
type ErrorCode string

// The codes the /starlight/ routes answer with. Every route writes its
// errors with WriteError, so this is the complete list.
const (
	// CodeBadRequest: the request can never succeed as sent (400), or its
	// body is too large (413).
	CodeBadRequest ErrorCode = "BAD_REQUEST"
	// CodeUnsupportedMediaType: the body is not application/json (415).
	CodeUnsupportedMediaType ErrorCode = "UNSUPPORTED_MEDIA_TYPE"
	// CodeUnauthorized: credentials are missing or do not grant the scope
	// (401, with the access controller's challenge); or the access
	// controller failed (400, as distribution answers then).
	CodeUnauthorized ErrorCode = "UNAUTHORIZED"
	// CodeNotFound: unknown route, repository, tag, digest, platform or
	// manifest (404).
	CodeNotFound ErrorCode = "NOT_FOUND"
	// CodeMethodNotAllowed: the route exists, the method does not (405).
	CodeMethodNotAllowed ErrorCode = "METHOD_NOT_ALLOWED"
	// CodeNotReady: the image is queued, converting or failed to convert
	// (409); the request succeeds once the image is ready.
	CodeNotReady ErrorCode = "NOT_READY"
	// CodeInternal: an index or storage failure (500). The details are in
	// the registry's log, never in the answer.
	CodeInternal ErrorCode = "INTERNAL_ERROR"
	// CodeUnavailable: the extension or one of its parts is not running
	// (503).
	CodeUnavailable ErrorCode = "UNAVAILABLE"
)

// Error is the JSON body of every 4xx/5xx answer of the /starlight/ API.
type Error struct {
	Code    ErrorCode `json:"code"`    // machine-readable, one of the Code constants
	Message string    `json:"message"` // human-readable
}

func (e *Error) Error() string {
	if e.Code == "" {
		return e.Message
	}
	return string(e.Code) + ": " + e.Message
}

// WriteError answers with status and an Error body. It is the one error
// writer of the /starlight/ routes, so that every route answers the same
// shape.
func WriteError(w http.ResponseWriter, status int, code ErrorCode, msg string) {
	WriteJSON(w, status, Error{Code: code, Message: msg})
}

// WriteJSON answers with status and v as JSON. The body is encoded before
// the status is sent, so a value that cannot be encoded still gets a
// well-formed 500 answer instead of a 200 with half a body.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	var buf bytes.Buffer
	if err := json.NewEncoder(&buf).Encode(v); err != nil {
		status = http.StatusInternalServerError
		buf.Reset()
		fmt.Fprintf(&buf, "{\"code\":%q,\"message\":\"encoding the response failed\"}\n", CodeInternal)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	// Error messages quote client input; a browser must not sniff them
	// into HTML.
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Length", strconv.Itoa(buf.Len()))
	w.WriteHeader(status)
	w.Write(buf.Bytes()) //nolint:errcheck // the client went away
}

// ReadError reads the error answer resp: a Starlight Error body, or
// distribution's {"errors":[...]} body (the first error), since the same
// client talks to the /v2/ routes. At most MaxErrorSize bytes are read; a
// body that is not one of these (plain text, HTML from a proxy, truncated)
// gives an Error with an empty Code and the status text as Message, so an
// empty Code tells that the answer did not come from a registry route.
// resp.Body is not closed.
func ReadError(resp *http.Response) *Error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, MaxErrorSize))
	var e Error
	if json.Unmarshal(b, &e) == nil && (e.Code != "" || e.Message != "") {
		return &e
	}
	var de struct {
		Errors []Error `json:"errors"`
	}
	if json.Unmarshal(b, &de) == nil && len(de.Errors) > 0 {
		return &de.Errors[0]
	}
	msg := http.StatusText(resp.StatusCode)
	if msg == "" {
		msg = "HTTP status " + strconv.Itoa(resp.StatusCode)
	}
	return &Error{Message: msg}
}
