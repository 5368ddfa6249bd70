package api

// Limits of the /starlight/ API and of the manifests behind it. They are
// here, not in the packages that enforce them, because both sides must
// agree: the registry refuses what is larger, a client never sends more.
const (
	// MaxManifestSize bounds a manifest or index read into memory. It is
	// distribution's own limit on a pushed manifest (maxManifestBodySize
	// in registry/handlers/manifests.go): the registry never stores a
	// larger one, and a converted manifest, which is pushed to a registry,
	// has to fit it too.
	MaxManifestSize = 4 << 20
	// MaxConfigSize bounds an image config read into memory. A config is
	// a blob, which distribution does not limit; long histories make
	// configs larger than manifests.
	MaxConfigSize = 8 << 20

	// MaxDeltaRequestSize bounds the body of POST /starlight/delta: the
	// most digests Have may hold, ~75 bytes each, fit with room to spare.
	MaxDeltaRequestSize = 2 << 20

	// MaxTraceReportSize bounds the body of POST /starlight/v1/traces. An
	// access takes about 250 bytes of JSON, so a report of
	// MaxTraceAccesses fits.
	MaxTraceReportSize = 64 << 20
	// MaxTraceAccesses bounds the accesses of one trace report. A worker
	// records at most this many, so it never records more than the
	// registry accepts.
	MaxTraceAccesses = 1 << 18

	// MaxHave bounds DeltaRequest.Have. A worker with more complete
	// layers than this sends the ones most likely to matter.
	MaxHave = 10000
	// MaxTraceLabel bounds the free-form worker and container names of a
	// trace report.
	MaxTraceLabel = 256
	// MaxTraceTime bounds TraceAccess.TimeNS (about 13 days), which keeps
	// the merge's integer arithmetic far from overflow.
	MaxTraceTime = int64(1) << 50

	// MaxErrorSize bounds the error body ReadError reads. An Error is a
	// code and a one-line message; anything longer is not one.
	MaxErrorSize = 64 << 10
)
