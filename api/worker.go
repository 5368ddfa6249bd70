package api

import "time"

// The starlight-worker API, served over HTTP on the worker's unix socket
// (--api) and used by ctr-starlight (package worker/client).
//
// Routes:
//
//	POST   /v1/pull            PullRequest → NDJSON stream of PullEvent
//	GET    /v1/images          → []WorkerImage
//	GET    /v1/images/{ref}    → WorkerImage (ref path-escaped; ?namespace= optional)
//	DELETE /v1/images/{ref}    → RemoveResult (?namespace=, default "default")
//	GET    /v1/optimize        → OptimizeState
//	PUT    /v1/optimize        OptimizeState → OptimizeState
//	GET    /v1/traces          → []TraceSummary
//	POST   /v1/traces/report   ReportRequest → ReportResult
//	GET    /v1/info            → WorkerInfo
//
// Errors outside a pull stream are answered with a non-2xx status and an
// Error (the same body as the registry's /starlight/ routes).

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
	// Platform selects the manifest of a multi-platform image:
	// "os/arch[/variant]" as containerd parses it ("linux/arm64",
	// "linux/arm/v7"). Empty means the worker's own platform.
	Platform string `json:"platform,omitempty"`
	// User, if set, is "user[:password]" for the registry, as ctr's
	// --user: the pull's own credentials, first for every host of the
	// pull, kept in the worker's memory for the life of the pull only.
	User string `json:"user,omitempty"`
}

// Pull states, in order. An image is usable from PullReady on.
const (
	PullResolving = "resolving" // asking the registry
	PullImporting = "importing" // header received, creating the image and snapshots
	PullReady     = "ready"     // usable; contents are still arriving
	PullComplete  = "complete"  // every content has arrived
	PullFailed    = "failed"
)

// PullEvent is one line of the NDJSON answer of POST /v1/pull.
type PullEvent struct {
	// Status is a pull state, or "progress" for a progress update.
	Status string `json:"status"`
	Ref    string `json:"ref"`
	// Message explains an error (Status "failed").
	Message string `json:"message,omitempty"`
	PullProgress
}

// PullEventProgress is the Status of an event that only updates counters.
const PullEventProgress = "progress"

// PullProgress counts the contents of a pull's bundle.
type PullProgress struct {
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

// WorkerImage is the state of an image pulled through the worker.
type WorkerImage struct {
	Ref       string `json:"ref"`
	Namespace string `json:"namespace"`
	// Digest is the (converted) manifest digest.
	Digest string `json:"digest,omitempty"`
	// Platform is the image's platform, "os/arch[/variant]" normalised
	// as containerd does: the one its config names, else the one the
	// pull asked for.
	Platform string `json:"platform,omitempty"`
	// Layers are the converted layer digests, base first.
	Layers []string `json:"layers,omitempty"`
	State  string   `json:"state"`
	// Complete is true when every content of the image is in the store.
	Complete bool   `json:"complete"`
	Error    string `json:"error,omitempty"`
	PullProgress
	// ImageBytes, DedupBytes and SendBytes are the registry's counters for
	// the bundle: compressed bytes of all contents of the image, of those
	// left out because the worker held them, and of those sent.
	ImageBytes int64 `json:"imageBytes"`
	DedupBytes int64 `json:"dedupBytes"`
	SendBytes  int64 `json:"sendBytes"`
	// PlainHTTP records that the pull talked HTTP to the registry; the
	// traces of the image are reported the same way.
	PlainHTTP bool `json:"plainHTTP,omitempty"`
	// Resumes counts how often a broken stream was resumed.
	Resumes   int        `json:"resumes,omitempty"`
	Started   time.Time  `json:"started"`
	Ready     *time.Time `json:"ready,omitempty"`
	Completed *time.Time `json:"completed,omitempty"`
}

// WorkerInfo answers GET /v1/info: what the worker is and what it is
// wired to. Paths are as the worker sees them.
type WorkerInfo struct {
	Version string `json:"version"`
	Commit  string `json:"commit"`
	// Containerd is the socket of the containerd the worker imports its
	// images into (ctr-starlight create dials it when given no address).
	Containerd string `json:"containerd"`
	// Root holds the worker's state; Address is its snapshotter socket.
	Root    string `json:"root"`
	Address string `json:"address"`
	// Platform is what a pull asks for when it names none, "os/arch[/variant]".
	Platform string `json:"platform"`
}

// Snapshot labels of a Starlight container (set by ctr-starlight create).
// They carry containerd's "containerd.io/snapshot/" prefix, the only
// labels containerd forwards to a proxy snapshotter.
const (
	// LabelOptimize = "true" traces the container whatever the optimize
	// mode; "false" never traces it.
	LabelOptimize = "containerd.io/snapshot/starlight.optimize"
	// LabelImageRef names the image the container runs, as pulled, so
	// that its trace goes to the right image even when several images
	// share the same layers.
	LabelImageRef = "containerd.io/snapshot/starlight.image-ref"
)

// OptimizeState is the body of GET and PUT /v1/optimize. On, every new
// container whose rootfs sits on Starlight layers is traced.
type OptimizeState struct {
	On bool `json:"on"`
}

// TraceSummary describes a trace the worker holds: recorded, not yet reported.
type TraceSummary struct {
	ID             string    `json:"id"`
	Ref            string    `json:"ref"`
	Registry       string    `json:"registry"`
	Repository     string    `json:"repository"`
	ManifestDigest string    `json:"manifestDigest"`
	Container      string    `json:"container"`
	StartedAt      time.Time `json:"startedAt"`
	// Accesses are the recorded first accesses (files and chunks); Files
	// the distinct files among them.
	Accesses int `json:"accesses"`
	Files    int `json:"files"`
	// Recording is true while the container runs and its trace grows;
	// Partial when the stored trace was written while it still ran.
	Recording bool `json:"recording,omitempty"`
	Partial   bool `json:"partial,omitempty"`
}

// ReportRequest is the body of POST /v1/traces/report.
type ReportRequest struct {
	// Server, if set, is the registry URL every trace goes to
	// ("http://host:port"), instead of the registry of its image.
	Server string `json:"server,omitempty"`
}

// ReportResult answers POST /v1/traces/report: one entry per trace.
// Uploaded traces are deleted; failed ones stay for the next report.
type ReportResult struct {
	Traces []TraceUpload `json:"traces"`
}

// TraceUpload is the outcome of one trace's upload.
type TraceUpload struct {
	TraceSummary
	URL string `json:"url"` // where it was posted
	// ReportID, Accepted and Existing are the registry's answer.
	ReportID string `json:"reportId,omitempty"`
	Accepted int    `json:"accepted,omitempty"`
	Existing bool   `json:"existing,omitempty"`
	// Error is the failure, verbatim; empty on success.
	Error string `json:"error,omitempty"`
}

// RemoveResult answers DELETE /v1/images/{ref}: what the image's removal
// freed on the worker.
type RemoveResult struct {
	Ref string `json:"ref"`
	// Layers and Contents were dropped because nothing else uses them;
	// Bytes is the size of those contents.
	Layers   int   `json:"layers"`
	Contents int   `json:"contents"`
	Bytes    int64 `json:"bytes"`
}
