// Package convert turns images into eStargz images and indexes eStargz
// layers. ConvertLayer rewrites one layer (gzip, zstd or uncompressed tar)
// as an eStargz blob, one gzip member per regular file or per chunk of a
// larger one, still a valid tar.gz; ConvertImage converts every layer of a
// manifest or index read from a Store and pushes the converted layers,
// configs and manifests back to it; ReadIndex reads the TOC of an eStargz
// blob into the entries, with chunk locations, that the registry indexes.
// A conversion is deterministic, and every error caused by the image
// itself matches ErrInvalid.
//
// The registry converts through its own storage (package registryext);
// ctr-starlight convert through two standard registries (convert/remote).
package convert

import (
	"context"
	"io"
	"os"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
)

// Annotations set on converted layer descriptors; the same keys the
// stargz-snapshotter uses, so other eStargz consumers understand our images.
const (
	AnnotationTOCDigest        = "containerd.io/snapshot/stargz/toc.digest"
	AnnotationUncompressedSize = "io.containers.estargz.uncompressed-size"
)

// DefaultChunkSize is the eStargz chunk size: small enough that a partly
// read large file (a JRE's modules, libjvm.so) travels chunk by chunk.
const DefaultChunkSize = 1 << 20

// Options tune a conversion.
type Options struct {
	ChunkSize        int    // eStargz chunk size; DefaultChunkSize when 0
	CompressionLevel int    // gzip level; gzip.BestCompression... default 6 (gzip.DefaultCompression) when 0
	TempDir          string // where uncompressed and converted layers are spooled; os.TempDir() when ""
	Parallelism      int    // concurrent layers and estargz workers; GOMAXPROCS when 0

	// MaxUncompressedSize bounds the uncompressed tar of one layer, in
	// bytes: a larger layer, or a gzip bomb, fails as invalid as soon as
	// its decompressed stream passes the limit, before more is written.
	// DefaultMaxUncompressedSize when 0; no limit when negative.
	MaxUncompressedSize int64
	// MaxEntries bounds the tar entries (files, directories, links...) of
	// one layer; a layer with more fails as invalid before it is built.
	// DefaultMaxEntries when 0; no limit when negative.
	MaxEntries int
}

// Default limits of a layer (Options). A conversion spools the uncompressed
// layer and its eStargz form, so it needs about twice MaxUncompressedSize of
// temporary space per concurrent layer. The TOC of a layer, which the index
// reads back, must stay under MaxTOCSize: a TOC takes about 370 bytes per
// regular file with a 55-byte name, so a layer of DefaultMaxEntries such
// files fits; a layer under the limit whose TOC does not (longer names)
// fails with a clear "TOC larger than" error.
const (
	DefaultMaxUncompressedSize = 16 << 30
	DefaultMaxEntries          = 300_000
)

// Index is what the registry indexes of one eStargz layer: its TOC digest
// and every entry, in TOC order, with chunk locations in the blob.
type Index struct {
	TOCDigest        digest.Digest
	UncompressedSize int64
	Entries          []api.Entry
}

// Layer is a converted layer spooled to a temporary file.
type Layer struct {
	// Desc describes the eStargz blob (digest, size, media type, and the
	// TOC-digest and uncompressed-size annotations).
	Desc   ocispec.Descriptor
	DiffID digest.Digest
	// SourceDiffID is the sha256 of the uncompressed source tar, to be
	// checked against the source image config's rootfs.diff_ids.
	SourceDiffID digest.Digest
	Index        *Index
	// File holds the blob; the caller reads it from offset 0 and must call
	// Close, which removes it.
	File *os.File
}

// Close removes the spooled blob.
func (l *Layer) Close() error {
	if l.File == nil {
		return nil
	}
	name := l.File.Name()
	err := l.File.Close()
	if rerr := os.Remove(name); err == nil {
		err = rerr
	}
	return err
}

// Store is the image store a conversion reads from and writes to: the
// registry's own storage, or a remote registry for ctr-starlight convert.
type Store interface {
	// Fetch opens a blob or manifest.
	Fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error)
	// Push stores a blob or manifest whose digest and size desc gives.
	Push(ctx context.Context, desc ocispec.Descriptor, r io.Reader) error
}

// ImageResult describes a converted image.
type ImageResult struct {
	// Desc is the converted root: a manifest, or an index for a
	// multi-platform image. Equal to the source when every layer already
	// was eStargz.
	Desc      ocispec.Descriptor
	Manifests []ManifestResult
}

// ManifestResult describes one converted platform manifest.
type ManifestResult struct {
	Platform ocispec.Platform
	Original ocispec.Descriptor // pushed platform manifest
	Desc     ocispec.Descriptor // converted platform manifest
	Config   ocispec.Descriptor // converted config
	Layers   []LayerResult      // base first
}

// LayerResult describes one converted layer of a manifest.
type LayerResult struct {
	Desc   ocispec.Descriptor // eStargz blob
	DiffID digest.Digest
	Index  *Index
	Reused bool // the source layer already was eStargz and was kept as is
}
