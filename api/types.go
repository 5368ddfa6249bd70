// Package api holds everything that crosses a process boundary in
// Starlight: the JSON of the registry's /starlight/ HTTP API, the header of
// a delta bundle, the file tree entries shared by the index, the registry
// and the worker, the JSON of the worker API (worker.go), the error codes
// every /starlight/ route answers with (errors.go, tabled in
// docs/BUNDLE.md §2) and the size limits both sides must agree on
// (limits.go). It has no dependencies beyond the standard library and
// go-digest so that every component can import it.
package api

import (
	"time"
)

// Entry types. They follow the eStargz TOC vocabulary ("reg", "dir", ...)
// so an index row, a TOC entry and a bundle entry read the same.
const (
	TypeReg      = "reg"
	TypeDir      = "dir"
	TypeSymlink  = "symlink"
	TypeHardlink = "hardlink"
	TypeChar     = "char"
	TypeBlock    = "block"
	TypeFifo     = "fifo"
)

// Whiteout markers, as they appear in OCI layer tars. The worker translates
// them into overlayfs whiteouts (0:0 character devices and the
// trusted.overlay.opaque xattr) when it exposes a layer.
const (
	WhiteoutPrefix = ".wh."
	WhiteoutOpaque = ".wh..wh..opq"
)

// Entry is one entry of a layer's file tree.
//
// Name is a clean relative path without a leading "./" or "/" (the layer
// root itself is never listed). Whiteouts are kept exactly as in the tar
// (".wh.NAME" regular files, ".wh..wh..opq"), so the index is a faithful
// description of the layer and consumers apply overlay semantics themselves.
type Entry struct {
	Name     string            `json:"name"`
	Type     string            `json:"type"`
	Mode     uint32            `json:"mode"` // permission bits plus setuid/setgid/sticky (07777)
	UID      int               `json:"uid"`
	GID      int               `json:"gid"`
	Size     int64             `json:"size,omitempty"`
	ModTime  time.Time         `json:"mtime"`
	LinkName string            `json:"linkName,omitempty"` // symlink target, or hard link target path
	DevMajor int64             `json:"devMajor,omitempty"`
	DevMinor int64             `json:"devMinor,omitempty"`
	Xattrs   map[string][]byte `json:"xattrs,omitempty"`
	// Digest is the sha256 of the whole content of a regular file with
	// Size > 0 ("sha256:<hex>"); empty otherwise.
	Digest string `json:"digest,omitempty"`
	// Chunks covers [0, Size) of a regular file in order. A file smaller
	// than the chunk size has exactly one chunk.
	Chunks []Chunk `json:"chunks,omitempty"`
}

// Chunk is one eStargz chunk of a regular file: an independent gzip member
// of the layer blob.
type Chunk struct {
	Offset int64  `json:"offset"` // offset in the uncompressed file
	Size   int64  `json:"size"`   // uncompressed size
	Digest string `json:"digest"` // sha256 of the uncompressed chunk
	// CompressedOffset and CompressedSize locate the raw gzip member in the
	// layer blob. The member starts with this chunk's data; the decoder reads
	// exactly Size bytes from it (an eStargz member may carry the following
	// tar headers after the data).
	CompressedOffset int64 `json:"compressedOffset"`
	CompressedSize   int64 `json:"compressedSize"`
}

// Platform identifies an image platform, as in the OCI image index.
type Platform struct {
	OS           string `json:"os"`
	Architecture string `json:"architecture"`
	Variant      string `json:"variant,omitempty"`
}

func (p Platform) String() string {
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}

// Conversion states of a pushed image.
const (
	StateQueued     = "queued"
	StateConverting = "converting"
	StateReady      = "ready"
	StateFailed     = "failed"
)

// ImageStatus is the body of GET /starlight/v1/images/<repository>/<tag-or-digest>.
type ImageStatus struct {
	Repository      string    `json:"repository"`
	Reference       string    `json:"reference"` // the tag or digest asked for
	Digest          string    `json:"digest"`    // pushed manifest (or index) digest
	State           string    `json:"state"`     // queued|converting|ready|failed
	ConvertedDigest string    `json:"convertedDigest,omitempty"`
	ConvertedTag    string    `json:"convertedTag,omitempty"`
	Error           string    `json:"error,omitempty"`
	Attempts        int       `json:"attempts"`
	Layers          int       `json:"layers"`
	Files           int       `json:"files"`
	UpdatedAt       time.Time `json:"updatedAt"`
}

// DeltaRequest is the body of POST /starlight/delta.
type DeltaRequest struct {
	// Reference is the image as pushed, without the registry host:
	// "repo/name:tag" or "repo/name@sha256:...".
	Reference string `json:"reference"`
	// Platform selects a manifest from a multi-platform image. Empty means
	// linux/amd64.
	Platform Platform `json:"platform"`
	// Have lists the converted layer digests the worker holds complete.
	// Every content of those layers is left out of the bundle.
	Have []string `json:"have,omitempty"`
	// Resume is the number of content frames already received from an
	// earlier, identical request whose stream broke. The header is always
	// sent whole; frames [Resume, len(Frames)) follow it.
	Resume int `json:"resume,omitempty"`
	// HeaderVersion is the highest bundle header version the worker
	// reads (docs/BUNDLE.md §3). 0 means 1: workers from before version 2
	// do not send it.
	HeaderVersion int `json:"headerVersion,omitempty"`
}

// BundleHeader opens a delta bundle. It carries everything needed to mount
// the image before any content arrives.
type BundleHeader struct {
	Version    int    `json:"version"`
	Repository string `json:"repository"`
	// ManifestDigest and Manifest are the converted image manifest for the
	// requested platform; Manifest is the exact stored bytes.
	ManifestDigest    string `json:"manifestDigest"`
	ManifestMediaType string `json:"manifestMediaType"`
	Manifest          []byte `json:"manifest"`
	ConfigDigest      string `json:"configDigest"`
	Config            []byte `json:"config"`
	// Layers are in manifest order (base first).
	Layers []LayerTree `json:"layers"`
	// Frames lists, in stream order, the content frames that follow.
	Frames []Frame     `json:"frames"`
	Stats  BundleStats `json:"stats"`
	Resume int         `json:"resume,omitempty"` // index of the first frame in this stream
}

// LayerTree is the complete file tree of one converted layer.
type LayerTree struct {
	Digest string `json:"digest"` // converted (eStargz) blob digest
	DiffID string `json:"diffID"`
	Size   int64  `json:"size"`
	// OriginalDigest is the layer of the image as pushed (normally gzip)
	// that this converted layer replaces, at the same position of the
	// pushed platform manifest. It lets a worker answer a pull that names
	// the original layers (a Kubernetes/CRI pull) with converted ones.
	// Empty when the pushed layer was already the converted one, or when
	// the registry cannot tell.
	OriginalDigest string  `json:"originalDigest,omitempty"`
	Entries        []Entry `json:"entries"`
}

// Frame is one content chunk in the bundle stream: CompressedSize raw bytes
// of a gzip member that decompresses to Size bytes of the file with content
// Digest at Offset, whose sha256 is ChunkDigest.
type Frame struct {
	Digest         string `json:"digest"`
	Offset         int64  `json:"offset"`
	Size           int64  `json:"size"`
	ChunkDigest    string `json:"chunkDigest"`
	CompressedSize int64  `json:"compressedSize"`
}

// BundleStats summarises a bundle. Sizes are compressed bytes of contents.
type BundleStats struct {
	ImageBytes int64 `json:"imageBytes"` // all distinct contents of the image
	DedupBytes int64 `json:"dedupBytes"` // left out because the worker holds them
	SendBytes  int64 `json:"sendBytes"`  // frames in this bundle (before Resume)
	Files      int   `json:"files"`      // entries in all layers
	Contents   int   `json:"contents"`   // distinct contents sent
}

// HTTP response headers of POST /starlight/delta, so a client can report
// the byte counters without parsing the header.
const (
	HeaderImageBytes = "Starlight-Image-Bytes"
	HeaderDedupBytes = "Starlight-Dedup-Bytes"
	HeaderSendBytes  = "Starlight-Send-Bytes"
)

// MediaTypeBundle is the Content-Type of a delta bundle response.
const MediaTypeBundle = "application/vnd.starlight.bundle.v1"

// TraceReport is the body of POST /starlight/v1/traces: the first accesses
// of one container run, recorded by a worker in optimize mode.
type TraceReport struct {
	// Repository and ManifestDigest name the converted platform manifest
	// the container ran (as in the bundle header).
	Repository     string    `json:"repository"`
	ManifestDigest string    `json:"manifestDigest"`
	Worker         string    `json:"worker,omitempty"` // free-form worker identity, e.g. its hostname
	Container      string    `json:"container,omitempty"`
	StartedAt      time.Time `json:"startedAt"`
	// Accesses are in order of first access.
	Accesses []TraceAccess `json:"accesses"`
}

// TraceAccess is the first access of a file (or, for chunk-level traces, of
// one chunk of a file) during a traced run.
type TraceAccess struct {
	Layer  string `json:"layer"`            // converted layer digest
	Name   string `json:"name"`             // entry name in that layer's tree
	Digest string `json:"digest,omitempty"` // content digest, when the entry has content
	// ChunkOffset is the offset of the chunk first read; 0 for a
	// file-level access (open) and for the first chunk.
	ChunkOffset int64 `json:"chunkOffset,omitempty"`
	TimeNS      int64 `json:"timeNs"` // since the container started
}

// TraceResult answers POST /starlight/v1/traces.
type TraceResult struct {
	ID       string `json:"id"`       // sha256 of the canonical report; re-uploads are no-ops
	Accepted int    `json:"accepted"` // accesses stored
	Existing bool   `json:"existing"` // the same report was already stored
}
