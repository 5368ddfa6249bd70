// Package client is the Go client of the starlight-worker API, served over
// HTTP on the worker's unix socket (--api). It also defines the JSON of
// that API, so that the worker and its clients share one definition.
//
// Routes:
//
//	POST /v1/pull           PullRequest → NDJSON stream of Event
//	GET  /v1/images         → []Image
//	GET  /v1/images/{ref}   → Image (ref path-escaped; ?namespace= optional)
//
// Errors outside a pull stream are answered with a non-2xx status and an
// ErrorBody.
package client

import "time"

// PullRequest is the body of POST /v1/pull.
type PullRequest struct {
	// Ref is the image reference as the user gave it
	// ("host:port/repo:tag" or "host/repo@sha256:..."). The image record in
	// containerd gets exactly this name.
	Ref string `json:"ref"`
	// PlainHTTP talks HTTP to the registry for this pull, whatever the
	// worker's registry configuration says.
	PlainHTTP bool `json:"plainHTTP,omitempty"`
	// Namespace is the containerd namespace; empty means "default".
	Namespace string `json:"namespace,omitempty"`
	// Wait keeps the event stream open until every content has arrived,
	// instead of ending it when the image is usable.
	Wait bool `json:"wait,omitempty"`
}

// Pull states, in order. An image is usable from StateReady on.
const (
	StateResolving = "resolving" // asking the registry
	StateImporting = "importing" // header received, creating the image and snapshots
	StateReady     = "ready"     // usable; contents are still arriving
	StateComplete  = "complete"  // every content has arrived
	StateFailed    = "failed"
)

// Event is one line of the NDJSON answer of POST /v1/pull.
type Event struct {
	// Status is a pull state, or "progress" for a progress update.
	Status string `json:"status"`
	Ref    string `json:"ref"`
	// Message explains an error (Status "failed").
	Message string `json:"message,omitempty"`
	Progress
}

// EventProgress is the Status of an event that only updates counters.
const EventProgress = "progress"

// Progress counts the contents of a pull's bundle.
type Progress struct {
	// Bytes are compressed content bytes of this pull's bundle.
	BytesReceived int64 `json:"bytesReceived"`
	BytesTotal    int64 `json:"bytesTotal"`
	// Frames are content chunks.
	FramesReceived int `json:"framesReceived"`
	FramesTotal    int `json:"framesTotal"`
	// Files are distinct file contents.
	FilesReceived int `json:"filesReceived"`
	FilesTotal    int `json:"filesTotal"`
}

// Image is the state of an image pulled through the worker.
type Image struct {
	Ref       string `json:"ref"`
	Namespace string `json:"namespace"`
	// Digest is the (converted) manifest digest.
	Digest string `json:"digest,omitempty"`
	// Layers are the converted layer digests, base first.
	Layers []string `json:"layers,omitempty"`
	State  string   `json:"state"`
	// Complete is true when every content of the image is in the store.
	Complete bool   `json:"complete"`
	Error    string `json:"error,omitempty"`
	Progress
	// ImageBytes, DedupBytes and SendBytes are the registry's counters for
	// the bundle: compressed bytes of all contents of the image, of those
	// left out because the worker held them, and of those sent.
	ImageBytes int64 `json:"imageBytes"`
	DedupBytes int64 `json:"dedupBytes"`
	SendBytes  int64 `json:"sendBytes"`
	// Resumes counts how often a broken stream was resumed.
	Resumes   int        `json:"resumes,omitempty"`
	Started   time.Time  `json:"started"`
	Ready     *time.Time `json:"ready,omitempty"`
	Completed *time.Time `json:"completed,omitempty"`
}

// ErrorBody is the JSON answer of a failed API request.
type ErrorBody struct {
	Message string `json:"message"`
}
