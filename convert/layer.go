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
	"syscall"

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

// bytesPerBuildPart sets how many bytes of file contents each concurrent
// estargz builder gets. estargz slices the tar into parts that are
// compressed in parallel, and the part boundaries show in the blob (each
// part starts a new gzip member). Deriving the part count from the input,
// not from the CPU count, keeps a conversion reproducible on any machine.
//
// The count must come from the contents, not from the tar's size: estargz
// cuts a part every (contents / parts) bytes of contents, and when that is
// 0 (more parts than content bytes, as in a layer of 100,000 empty files
// and a few MiB of tar headers) it cuts one part per entry, each with its
// goroutine and temporary file, until the process runs out of files.
const (
	bytesPerBuildPart = 16 << 20
	maxBuildParts     = 16
)

func buildParts(contents int64) int {
	n := contents / bytesPerBuildPart
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
	// Negative limits (none) stay negative, so that applying the defaults
	// twice changes nothing.
	if o.MaxUncompressedSize == 0 {
		o.MaxUncompressedSize = DefaultMaxUncompressedSize
	}
	if o.MaxEntries == 0 {
		o.MaxEntries = DefaultMaxEntries
	}
	return o
}

// ConvertLayer converts a layer blob (gzip, zstd or uncompressed tar) into an
// eStargz blob spooled to a temporary file in opts.TempDir.
//
// The source tar is validated entry by entry while it is decompressed; a
// layer with paths escaping the root, hard links to unknown or escaping
// targets, entries written through a symlink or below a non-directory of
// the same layer, unknown entry types, a truncated stream, or more bytes or
// entries than opts allows is rejected with an error naming the entry or
// the limit. estargz builds its intermediate parts in os.TempDir(); they
// are removed before ConvertLayer returns.
func ConvertLayer(ctx context.Context, r io.Reader, opts Options) (_ *Layer, retErr error) {
	opts = opts.withDefaults()
	src, err := spoolTar(ctx, r, opts)
	if err != nil {
		return nil, err
	}
	if err := src.raw.err(); err != nil {
		removeTemp(src.file)
		return nil, err
	}
	tarFile, tarSize := src.file, src.size
	if src.duplicates {
		nf, n, err := normalizeTar(src.file, src.size, opts.TempDir)
		if err != nil {
			removeTemp(src.file)
			return nil, err
		}
		if nf != nil {
			removeTemp(src.file)
			tarFile, tarSize = nf, n
		}
	}

	// Cancellation reaches estargz through its input, not through
	// estargz.WithContext: on cancellation that option removes the
	// temporary files created so far while the parts still being started
	// create theirs, which then stay behind. A failing input makes Build
	// fail and remove every file after its parts have stopped.
	blob, err := estargz.Build(io.NewSectionReader(ctxReaderAt{ctx: ctx, r: tarFile}, 0, tarSize),
		estargz.WithChunkSize(opts.ChunkSize),
		estargz.WithCompression(newCompression(opts.CompressionLevel)),
		estargz.WithParallelism(buildParts(src.contents)),
	)
	// Build has read the whole tar into its parts: the spool goes now, so
	// a conversion needs about twice the layer's size of temporary space,
	// not three times.
	removeTemp(tarFile)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, tempErr(os.TempDir(), fmt.Errorf("building eStargz: %w", err))
	}
	defer closeBlob(blob)

	out, err := os.CreateTemp(opts.TempDir, "starlight-estargz-*")
	if err != nil {
		return nil, tempErr(opts.TempDir, fmt.Errorf("creating temporary file: %w", err))
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
		return nil, tempErr(opts.TempDir, fmt.Errorf("writing eStargz blob: %w", err))
	}
	// DiffID and UncompressedSize are valid once the blob has been read to
	// its end, which io.Copy did.
	usize, err := blob.UncompressedSize()
	if err != nil {
		return nil, fmt.Errorf("building eStargz: %w", err)
	}
	idx, err := ReadIndex(out, size)
	if err != nil {
		// A layer within the limits can still make a TOC larger than
		// MaxTOCSize (long names); that is the layer's doing.
		if errors.Is(err, ErrInvalid) {
			return nil, fmt.Errorf("layer: converted: %w", err)
		}
		return nil, fmt.Errorf("reading back the converted layer: %w", err)
	}
	if idx.TOCDigest != blob.TOCDigest() {
		return nil, fmt.Errorf("reading back the converted layer: TOC digest %s, built %s", idx.TOCDigest, blob.TOCDigest())
	}
	if err := src.raw.restore(idx.Entries); err != nil {
		return nil, err
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
	file     *os.File
	size     int64
	contents int64 // bytes of regular file contents
	diffID   digest.Digest
	// duplicates: some name has more than one entry (normalizeTar).
	duplicates bool
	raw        *rawNames
}

// spoolTar decompresses r into a temporary file, validating every tar header
// on the way.
func spoolTar(ctx context.Context, r io.Reader, opts Options) (_ *spooledTar, retErr error) {
	f, err := os.CreateTemp(opts.TempDir, "starlight-tar-*")
	if err != nil {
		return nil, tempErr(opts.TempDir, fmt.Errorf("creating temporary file: %w", err))
	}
	defer func() {
		if retErr != nil {
			removeTemp(f)
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	var (
		contents   int64
		seen       = map[string]bool{}
		duplicates bool
		raw        = &rawNames{}
	)
	size, diffID, err := scanTar(ctx, r, opts, bw, func(h *tar.Header, _ io.Reader) error {
		contents += h.Size              // 0 but for regular files (tarValidator)
		name, _ := cleanTarName(h.Name) // valid: tarValidator checked it
		duplicates = duplicates || seen[name]
		seen[name] = true
		raw.addName(name)
		if h.Typeflag == tar.TypeSymlink {
			raw.addTarget(h.Linkname)
		}
		return nil
	})
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		if errors.Is(err, ErrInvalid) || ctx.Err() != nil {
			return nil, err
		}
		return nil, tempErr(opts.TempDir, fmt.Errorf("spooling the uncompressed layer: %w", err))
	}
	return &spooledTar{file: f, size: size, contents: contents, diffID: diffID, duplicates: duplicates, raw: raw}, nil
}

// scanTar reads a layer (gzip, zstd or plain tar) to its end, validating
// every tar header (tarValidator) and the limits of opts, copying the
// uncompressed stream to sink, and calling visit, if not nil, with every
// header and its content. It returns the uncompressed size and digest
// (the diff_id). Errors caused by the layer match ErrInvalid; an error
// writing to sink is returned as it is.
func scanTar(ctx context.Context, r io.Reader, opts Options, sink io.Writer, visit func(*tar.Header, io.Reader) error) (int64, digest.Digest, error) {
	br := bufio.NewReaderSize(&ctxReader{ctx: ctx, r: r}, 1<<20)
	magic, err := br.Peek(4)
	if err != nil && !errors.Is(err, io.EOF) {
		return 0, "", fmt.Errorf("reading layer: %w", err)
	}
	var src io.Reader = br
	switch {
	case bytes.HasPrefix(magic, magicGzip):
		zr, err := pgzip.NewReader(br)
		if err != nil {
			return 0, "", invalid(fmt.Errorf("layer: invalid gzip stream: %w", err))
		}
		defer zr.Close()
		src = zr
	case bytes.HasPrefix(magic, magicZstd):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return 0, "", invalid(fmt.Errorf("layer: invalid zstd stream: %w", err))
		}
		defer zr.Close()
		src = zr
	}

	// The limit is applied to the decompressed stream before anything is
	// written: a gzip bomb fails after at most the limit, not after
	// filling the disk.
	lim := &limitReader{r: src, max: opts.MaxUncompressedSize}
	out := &errWriter{w: sink}
	h := sha256.New()
	cw := &countWriter{}
	// The tar reader sees every byte of the stream (it reads through, not
	// seeks over, the contents), so the sink receives the tar verbatim.
	tee := io.TeeReader(lim, io.MultiWriter(out, h, cw))
	// fail turns a read error into the error that caused it: the limit, the
	// sink, the context, or the layer.
	fail := func(err error, what string) error {
		switch {
		case lim.err != nil:
			return lim.err
		case out.err != nil:
			return out.err
		case ctx.Err() != nil:
			return ctx.Err()
		}
		return invalid(fmt.Errorf("layer: %s: %w", what, err))
	}
	tr := tar.NewReader(tee)
	v := newTarValidator()
	last := "(none)"
	entries := 0
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return 0, "", fail(err, "tar truncated in or after entry "+last)
			}
			return 0, "", fail(err, "invalid tar header after entry "+last)
		}
		if entries++; opts.MaxEntries > 0 && entries > opts.MaxEntries {
			return 0, "", invalid(fmt.Errorf("layer: more than %d entries, the limit of entries per layer", opts.MaxEntries))
		}
		if err := v.check(hdr); err != nil {
			return 0, "", invalid(fmt.Errorf("layer: %w", err))
		}
		last = strconv.Quote(hdr.Name)
		if visit != nil {
			if err := visit(hdr, tr); err != nil {
				if lim.err != nil || out.err != nil || ctx.Err() != nil {
					return 0, "", fail(err, "")
				}
				return 0, "", err
			}
		}
	}
	if cw.n == 0 {
		return 0, "", invalid(errors.New("layer: empty blob, not a tar archive"))
	}
	// Read the stream to its end through the tee: the diff_id covers every
	// uncompressed byte, including the zero padding after the end-of-archive
	// marker that GNU tar adds up to its record size; reading to the end also
	// verifies the gzip checksum and notices a stream truncated after the
	// tar trailer.
	if _, err := io.Copy(io.Discard, tee); err != nil {
		return 0, "", fail(err, "reading to the end of the stream")
	}
	return cw.n, digest.NewDigest(digest.SHA256, h), nil
}

// limitReader fails the read that takes the stream past max bytes (no
// limit when max <= 0).
type limitReader struct {
	r      io.Reader
	max, n int64
	err    error
}

func (l *limitReader) Read(p []byte) (int, error) {
	if l.err != nil {
		return 0, l.err
	}
	if l.max > 0 && int64(len(p)) > l.max-l.n+1 {
		p = p[:l.max-l.n+1]
	}
	n, err := l.r.Read(p)
	l.n += int64(n)
	if l.max > 0 && l.n > l.max {
		l.err = invalid(fmt.Errorf("layer: uncompressed size exceeds %d bytes, the limit per layer", l.max))
		return 0, l.err
	}
	return n, err
}

// errWriter remembers the first error of w, so that a disk-full spool is
// not mistaken for a broken layer by the reader that saw it.
type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) Write(p []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	n, err := e.w.Write(p)
	if err != nil {
		e.err = err
	}
	return n, err
}

// tempErr names the temporary directory in an error that filled it.
func tempErr(dir string, err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("temporary directory %s is full (free space, or set a larger tempdir): %w", dir, err)
	}
	return err
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
		if t == typeWhiteout {
			return fmt.Errorf("hard link %q to %q: the target is a whiteout", h.Name, h.Linkname)
		}
		if err := v.checkParents(target); err != nil {
			return fmt.Errorf("hard link %q to %q: %w", h.Name, h.Linkname, err)
		}
		v.linked[target] = struct{}{}
	}
	if _, ok := v.types[name]; ok {
		// A layer keeps one entry per name (normalizeTar), so a hard
		// link to the first copy would lose its target.
		if _, ok := v.linked[name]; ok {
			return fmt.Errorf("entry %q: redefines the target of an earlier hard link", h.Name)
		}
	}
	if h.Size < 0 || (h.Typeflag != tar.TypeReg && h.Size != 0) {
		return fmt.Errorf("entry %q: invalid size %d", h.Name, h.Size)
	}
	hidden, isWhiteout, err := whiteoutTarget(name)
	if err != nil {
		return fmt.Errorf("entry %q: %w", h.Name, err)
	}
	v.types[name] = h.Typeflag
	if isWhiteout {
		v.types[hidden] = typeWhiteout
	}
	return nil
}

// checkParents rejects a name below an entry of the layer that is not a
// directory. Below a symlink, unpacking it would write through the link,
// possibly outside the root; below a regular file (or a device, a hard
// link, a whiteout), unpacking fails, and so does the worker's tree, so
// the layer must not convert.
func (v *tarValidator) checkParents(name string) error {
	for p := path.Dir(name); p != "."; p = path.Dir(p) {
		t, ok := v.types[p]
		switch {
		case !ok || t == tar.TypeDir:
		case t == tar.TypeSymlink:
			return fmt.Errorf("its parent %q is a symlink created earlier in the layer", p)
		default:
			return fmt.Errorf("its parent %q is not a directory: an earlier entry of the layer made it a %s", p, tarTypeName(t))
		}
	}
	return nil
}

// tarTypeName names a tar type flag of a validated entry.
func tarTypeName(t byte) string {
	switch t {
	case tar.TypeReg:
		return "regular file"
	case tar.TypeLink:
		return "hard link"
	case tar.TypeChar:
		return "character device"
	case tar.TypeBlock:
		return "block device"
	case tar.TypeFifo:
		return "fifo"
	case typeWhiteout:
		return "whiteout"
	}
	return fmt.Sprintf("entry of type %q", t)
}

// typeWhiteout stands, in tarValidator.types, for the name a ".wh.NAME"
// entry hides: the layer's tree has a whiteout (a 0:0 character device)
// there, which no later entry can be below.
const typeWhiteout = 'w'

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

// ctxReaderAt fails every read once its context is cancelled.
type ctxReaderAt struct {
	ctx context.Context
	r   io.ReaderAt
}

func (c ctxReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.ReadAt(p, off)
}

// closeBlob removes the temporary files of a built blob. A blob not read
// to its end still has estargz's goroutine writing to it; with the files
// closed, draining it makes that goroutine fail and return.
func closeBlob(b *estargz.Blob) {
	b.Close()
	io.Copy(io.Discard, b) //nolint:errcheck // fails by design
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
