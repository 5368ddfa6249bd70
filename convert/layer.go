package convert

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"runtime"
	"strconv"
	"strings"
	"sync"

	"github.com/containerd/stargz-snapshotter/estargz"
	kgzip "github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/klauspost/pgzip"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
)

// Magic numbers of the compressed layer formats ConvertLayer accepts.
var (
	magicGzip = []byte{0x1f, 0x8b, 0x08}
	magicZstd = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// bytesPerBuildPart sets how many uncompressed bytes each concurrent estargz
// builder gets. estargz slices the tar into parts that are compressed in
// parallel, and the part boundaries show in the blob (each part starts a new
// gzip member). Deriving the part count from the input, not from the CPU
// count, keeps a conversion reproducible on any machine.
const (
	bytesPerBuildPart = 16 << 20
	maxBuildParts     = 16
)

func buildParts(size int64) int {
	n := size / bytesPerBuildPart
	if n < 1 {
		return 1
	}
	if n > maxBuildParts {
		return maxBuildParts
	}
	return int(n)
}

func (o Options) withDefaults() Options {
	if o.ChunkSize <= 0 {
		o.ChunkSize = DefaultChunkSize
	}
	if o.CompressionLevel == 0 {
		o.CompressionLevel = kgzip.DefaultCompression
	}
	if o.TempDir == "" {
		o.TempDir = os.TempDir()
	}
	if o.Parallelism <= 0 {
		o.Parallelism = runtime.GOMAXPROCS(0)
	}
	return o
}

// ConvertLayer converts a layer blob (gzip, zstd or uncompressed tar) into an
// eStargz blob spooled to a temporary file in opts.TempDir.
//
// The source tar is validated entry by entry while it is decompressed; a
// layer with paths escaping the root, hard links to unknown or escaping
// targets, entries written through a symlink of the same layer, unknown
// entry types or a truncated stream is rejected with an error naming the
// entry. estargz builds its intermediate parts in os.TempDir(); they are
// removed before ConvertLayer returns.
func ConvertLayer(ctx context.Context, r io.Reader, opts Options) (_ *Layer, retErr error) {
	opts = opts.withDefaults()
	src, err := spoolTar(ctx, r, opts.TempDir)
	if err != nil {
		return nil, err
	}
	defer removeTemp(src.file)

	blob, err := estargz.Build(io.NewSectionReader(src.file, 0, src.size),
		estargz.WithChunkSize(opts.ChunkSize),
		estargz.WithCompression(newCompression(opts.CompressionLevel)),
		estargz.WithParallelism(buildParts(src.size)),
		estargz.WithContext(ctx),
	)
	if err != nil {
		return nil, fmt.Errorf("building eStargz: %w", err)
	}
	defer blob.Close()

	out, err := os.CreateTemp(opts.TempDir, "starlight-estargz-*")
	if err != nil {
		return nil, fmt.Errorf("creating temporary file: %w", err)
	}
	defer func() {
		if retErr != nil {
			removeTemp(out)
		}
	}()
	h := sha256.New()
	bw := bufio.NewWriterSize(out, 1<<20)
	size, err := io.Copy(io.MultiWriter(bw, h), &ctxReader{ctx: ctx, r: blob})
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		return nil, fmt.Errorf("writing eStargz blob: %w", err)
	}
	// DiffID and UncompressedSize are valid once the blob has been read to
	// its end, which io.Copy did.
	usize, err := blob.UncompressedSize()
	if err != nil {
		return nil, fmt.Errorf("building eStargz: %w", err)
	}
	idx, err := ReadIndex(out, size)
	if err != nil {
		return nil, fmt.Errorf("reading back the converted layer: %w", err)
	}
	if idx.TOCDigest != blob.TOCDigest() {
		return nil, fmt.Errorf("reading back the converted layer: TOC digest %s, built %s", idx.TOCDigest, blob.TOCDigest())
	}
	idx.UncompressedSize = usize
	if _, err := out.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	return &Layer{
		Desc: ocispec.Descriptor{
			MediaType: ocispec.MediaTypeImageLayerGzip,
			Digest:    digest.NewDigest(digest.SHA256, h),
			Size:      size,
			Annotations: map[string]string{
				AnnotationTOCDigest:        idx.TOCDigest.String(),
				AnnotationUncompressedSize: strconv.FormatInt(usize, 10),
			},
		},
		DiffID:       blob.DiffID(),
		SourceDiffID: src.diffID,
		Index:        idx,
		File:         out,
	}, nil
}

// spooledTar is a validated, uncompressed source tar in a temporary file.
type spooledTar struct {
	file   *os.File
	size   int64
	diffID digest.Digest
}

// spoolTar decompresses r into a temporary file, validating every tar header
// on the way.
func spoolTar(ctx context.Context, r io.Reader, dir string) (_ *spooledTar, retErr error) {
	br := bufio.NewReaderSize(&ctxReader{ctx: ctx, r: r}, 1<<20)
	magic, err := br.Peek(4)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("reading layer: %w", err)
	}
	var src io.Reader = br
	switch {
	case bytes.HasPrefix(magic, magicGzip):
		zr, err := pgzip.NewReader(br)
		if err != nil {
			return nil, invalid(fmt.Errorf("layer: invalid gzip stream: %w", err))
		}
		defer zr.Close()
		src = zr
	case bytes.HasPrefix(magic, magicZstd):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, invalid(fmt.Errorf("layer: invalid zstd stream: %w", err))
		}
		defer zr.Close()
		src = zr
	}

	f, err := os.CreateTemp(dir, "starlight-tar-*")
	if err != nil {
		return nil, fmt.Errorf("creating temporary file: %w", err)
	}
	defer func() {
		if retErr != nil {
			removeTemp(f)
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	h := sha256.New()
	cw := &countWriter{}
	// The tar reader sees every byte of the stream (it reads through, not
	// seeks over, the contents), so the file receives the tar verbatim.
	tee := io.TeeReader(src, io.MultiWriter(bw, h, cw))
	tr := tar.NewReader(tee)
	v := newTarValidator()
	last := "(none)"
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			if ctxErr := ctx.Err(); ctxErr != nil {
				return nil, ctxErr
			}
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return nil, invalid(fmt.Errorf("layer: tar truncated in or after entry %s: %w", last, err))
			}
			return nil, invalid(fmt.Errorf("layer: invalid tar header after entry %s: %w", last, err))
		}
		if err := v.check(hdr); err != nil {
			return nil, invalid(fmt.Errorf("layer: %w", err))
		}
		last = strconv.Quote(hdr.Name)
	}
	if cw.n == 0 {
		return nil, invalid(errors.New("layer: empty blob, not a tar archive"))
	}
	// Read the stream to its end through the tee: the diff_id covers every
	// uncompressed byte, including the zero padding after the end-of-archive
	// marker that GNU tar adds up to its record size; reading to the end also
	// verifies the gzip checksum and notices a stream truncated after the
	// tar trailer.
	if _, err := io.Copy(io.Discard, tee); err != nil {
		return nil, invalid(fmt.Errorf("layer: reading to the end of the stream: %w", err))
	}
	if err := bw.Flush(); err != nil {
		return nil, fmt.Errorf("writing temporary file: %w", err)
	}
	return &spooledTar{file: f, size: cw.n, diffID: digest.NewDigest(digest.SHA256, h)}, nil
}

// tarValidator rejects tar entries that would escape or corrupt the root
// they are unpacked into.
type tarValidator struct {
	types  map[string]byte     // clean name -> type flag of its latest entry
	linked map[string]struct{} // hard link targets
}

func newTarValidator() *tarValidator {
	return &tarValidator{types: map[string]byte{}, linked: map[string]struct{}{}}
}

func (v *tarValidator) check(h *tar.Header) error {
	name, err := cleanTarName(h.Name)
	if err != nil {
		return fmt.Errorf("entry %q: %w", h.Name, err)
	}
	if name == "" {
		if h.Typeflag != tar.TypeDir {
			return fmt.Errorf("entry %q: the layer root must be a directory", h.Name)
		}
		return nil
	}
	switch h.Typeflag {
	case tar.TypeReg, tar.TypeDir, tar.TypeSymlink, tar.TypeLink,
		tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
	default:
		return fmt.Errorf("entry %q: unsupported entry type %q", h.Name, h.Typeflag)
	}
	if err := v.checkParents(name); err != nil {
		return fmt.Errorf("entry %q: %w", h.Name, err)
	}
	if h.Typeflag == tar.TypeLink {
		target, err := cleanTarName(h.Linkname)
		if err == nil && target == "" {
			err = errors.New("names the layer root")
		}
		if err != nil {
			return fmt.Errorf("hard link %q to %q: %w", h.Name, h.Linkname, err)
		}
		t, ok := v.types[target]
		if !ok {
			return fmt.Errorf("hard link %q to %q: the target is not an earlier entry of the layer", h.Name, h.Linkname)
		}
		if t == tar.TypeDir {
			return fmt.Errorf("hard link %q to %q: the target is a directory", h.Name, h.Linkname)
		}
		if err := v.checkParents(target); err != nil {
			return fmt.Errorf("hard link %q to %q: %w", h.Name, h.Linkname, err)
		}
		v.linked[target] = struct{}{}
	}
	if _, ok := v.types[name]; ok {
		// estargz keeps only the last entry of a name and moves it to the
		// end, so a hard link to the first copy would lose its target.
		if _, ok := v.linked[name]; ok {
			return fmt.Errorf("entry %q: redefines the target of an earlier hard link", h.Name)
		}
	}
	if h.Size < 0 || (h.Typeflag != tar.TypeReg && h.Size != 0) {
		return fmt.Errorf("entry %q: invalid size %d", h.Name, h.Size)
	}
	v.types[name] = h.Typeflag
	return nil
}

// checkParents rejects a name below a symlink created earlier in the layer:
// unpacking it would write through the symlink, possibly outside the root.
func (v *tarValidator) checkParents(name string) error {
	for p := path.Dir(name); p != "."; p = path.Dir(p) {
		if v.types[p] == tar.TypeSymlink {
			return fmt.Errorf("its parent %q is a symlink created earlier in the layer", p)
		}
	}
	return nil
}

// cleanTarName turns a tar entry name into a clean relative path ("" for the
// layer root). A leading "./" and a trailing "/" are normal; "..", absolute
// paths and NUL bytes are not.
func cleanTarName(name string) (string, error) {
	if strings.HasPrefix(name, "/") {
		return "", errors.New("absolute path")
	}
	for _, el := range strings.Split(name, "/") {
		if el == ".." {
			return "", errors.New("path escapes the layer root")
		}
	}
	c := path.Clean(name)
	if c == "." {
		return "", nil
	}
	if err := api.ValidateName(c); err != nil {
		return "", err
	}
	return c, nil
}

// compression is estargz's gzip compression with klauspost's compressor,
// about twice as fast as compress/gzip at the same level, and pgzip for the
// DiffID pass over the built blob.
type compression struct {
	level int
	*estargz.GzipCompressor
	*estargz.GzipDecompressor
}

func newCompression(level int) *compression {
	return &compression{
		level:            level,
		GzipCompressor:   estargz.NewGzipCompressorWithLevel(level),
		GzipDecompressor: &estargz.GzipDecompressor{},
	}
}

// Writer returns a gzip writer for one eStargz member. estargz opens a new
// member for every file and chunk, and a deflate compressor allocates about
// a megabyte, so writers are pooled per level: without the pool, allocation
// and zeroing take a third of a conversion's CPU time on layers of small
// files.
func (c *compression) Writer(w io.Writer) (estargz.WriteFlushCloser, error) {
	pool := gzipPool(c.level)
	if zw, ok := pool.Get().(*kgzip.Writer); ok {
		zw.Reset(w)
		return &pooledGzip{Writer: zw, pool: pool}, nil
	}
	zw, err := kgzip.NewWriterLevel(w, c.level)
	if err != nil {
		return nil, err
	}
	return &pooledGzip{Writer: zw, pool: pool}, nil
}

var gzipPools sync.Map // level -> *sync.Pool of *kgzip.Writer

func gzipPool(level int) *sync.Pool {
	p, _ := gzipPools.LoadOrStore(level, &sync.Pool{})
	return p.(*sync.Pool)
}

// pooledGzip returns its writer to the pool when the member is closed;
// estargz never touches a member after closing it.
type pooledGzip struct {
	*kgzip.Writer
	pool *sync.Pool
}

func (p *pooledGzip) Close() error {
	err := p.Writer.Close()
	p.pool.Put(p.Writer)
	p.Writer = nil
	return err
}

func (c *compression) Reader(r io.Reader) (io.ReadCloser, error) {
	return pgzip.NewReader(r)
}

// ctxReader stops a long copy when its context is cancelled.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	return len(p), nil
}

func removeTemp(f *os.File) {
	f.Close()
	os.Remove(f.Name())
}
