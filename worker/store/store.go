// Package store is the worker's content-addressed store of file contents.
//
// Every regular file of every layer is stored once, by the sha256 of its
// content, and shared by all layers and images of the worker:
//
//	<root>/content/sha256/<2 hex>/<hex>   complete, verified contents
//	<root>/partial/<hex>                  contents still arriving
//
// Contents arrive chunk by chunk (one eStargz chunk per bundle frame), in any
// order. A chunk becomes readable as soon as its own digest has been
// verified, so a reader of a partly arrived file is served as soon as the
// chunks that cover its read are in. Once every chunk is in, the whole file
// is verified against its digest and renamed into content/. Nothing
// unverified is ever readable or renamed into content/. Contents are not
// synced one by one: Sync (one syncfs) makes them durable before a layer
// is recorded complete, and after an unclean shutdown the next Open
// verifies every content again.
//
// File names are built only from digests that passed api.ParseDigest, whose
// hex is checked, so a hostile digest cannot escape the store root.
package store

import (
	"context"
	"crypto/sha256"
	"encoding"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/starlight-project/starlight/api"
)

var (
	// ErrFailed is wrapped by the error readers get for a content that
	// will not arrive (its bundle failed for good, or it did not verify).
	ErrFailed = errors.New("content failed")
	// ErrNotFound is wrapped when a content is neither complete nor
	// expected.
	ErrNotFound = errors.New("content not found")
	// ErrMismatch is wrapped when data does not match its expected
	// layout or digest.
	ErrMismatch = errors.New("content mismatch")
	// ErrStorage is wrapped by the errors of the store's own disk: a
	// write, a file creation or a rename that failed, a full disk.
	// Unlike a broken or corrupt stream, asking the registry again does
	// not help until the disk is fixed or has space again.
	ErrStorage = errors.New("store write failed")
)

// storageError wraps err, an error of the store's disk, with ErrStorage,
// and says so plainly when the disk is full.
func (s *Store) storageError(err error) error {
	switch {
	case errors.Is(err, ErrStorage):
		return err
	case errors.Is(err, unix.ENOSPC):
		return fmt.Errorf("%w: the disk of the store %s is full (ENOSPC): %w", ErrStorage, s.root, err)
	case errors.Is(err, unix.EDQUOT):
		return fmt.Errorf("%w: the disk quota of the store %s is exhausted (EDQUOT): %w", ErrStorage, s.root, err)
	}
	return fmt.Errorf("%w: %w", ErrStorage, err)
}

// emptyDigest is the sha256 of no bytes, the content of every empty file.
var emptyDigest = digest.SHA256.FromBytes(nil)

// Store is a content-addressed store of file contents. It is safe for
// concurrent use.
type Store struct {
	root string

	// expectMu serialises Expect, so that two callers never prepare the
	// same partial file at once.
	expectMu sync.Mutex

	mu sync.Mutex
	// pending holds the contents that are expected but not complete: the
	// ones arriving and the failed ones (so that their readers get the
	// error). A content leaves the map when it is renamed into content/.
	pending map[digest.Digest]*content

	// demand, if set, is told about reads blocked on chunks nobody is
	// writing (SetDemandHandler).
	demand func(Demand)
	// frameGate, if set, is waited on before every bundle frame
	// (SetFrameGate).
	frameGate func(context.Context)
}

// content is the state of one expected content. Its fields are guarded by
// Store.mu, except that the partial file is written outside the lock by the
// writer that owns a chunk (busy), and the running hash by the writer that
// owns it (hashBusy).
type content struct {
	d      digest.Digest
	size   int64
	chunks []api.Chunk // sorted, contiguous, covering [0, size)
	have   []bool      // chunk i is written and verified
	busy   []bool      // a writer is writing chunk i
	// missing counts the chunks not yet in.
	missing int
	// f is the partial file; nil once the content is complete or failed.
	f   *os.File
	err error // non-nil once failed; wraps ErrFailed
	// finishing is set while the whole file is verified and renamed.
	finishing bool
	// changed is closed (and replaced) on every change of state readers
	// wait for: a chunk arrived, the content completed or failed.
	changed chan struct{}

	// hash is the running sha256 of [0, hashed): chunks that arrive in
	// order are hashed while they are written, so the final verification
	// usually reads nothing back.
	hash     hash.Hash
	hashed   int64
	hashBusy bool
}

func (c *content) broadcast() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// Open opens (creating if needed) the store rooted at root.
//
// Partial files left by an earlier run are kept: when their content is
// expected again, every chunk in them is re-verified and only the chunks
// that match their digest count as arrived.
func Open(root string) (*Store, error) {
	for _, dir := range []string{
		filepath.Join(root, "content", "sha256"),
		filepath.Join(root, "partial"),
	} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("opening store: %w", err)
		}
	}
	s := &Store{root: root, pending: make(map[digest.Digest]*content)}
	marker := filepath.Join(root, uncleanMarker)
	boot := bootID()
	if b, err := os.ReadFile(marker); err == nil && (boot == "" || string(b) != boot) {
		// The machine went down since (or the marker predates boot
		// IDs): what was not synced may be torn. If only the previous
		// process died, during this boot, everything it wrote is in
		// the page cache and reaches the disk: nothing to verify, and
		// a worker killed with -9 starts as fast as a stopped one.
		removed, err := s.verifyContents()
		if err != nil {
			return nil, fmt.Errorf("opening store after an unclean shutdown: verifying contents: %w", err)
		}
		if removed > 0 {
			log.L.WithField("removed", removed).Warn("store: removed contents torn by an unclean shutdown")
		}
	}
	if err := os.WriteFile(marker, []byte(boot), 0o600); err != nil {
		return nil, fmt.Errorf("opening store: %w", err)
	}
	return s, nil
}

// bootID identifies the running boot of the machine ("" if unknown).
func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// Root returns the directory of the store.
func (s *Store) Root() string { return s.root }

// parse validates a digest received from anywhere before it is used to
// build a path.
func parse(d digest.Digest) (digest.Digest, error) {
	return api.ParseDigest(string(d))
}

// path returns the path of a complete content. d must have been parsed.
func (s *Store) path(d digest.Digest) string {
	hex := d.Encoded()
	return filepath.Join(s.root, "content", "sha256", hex[:2], hex)
}

// partialPath returns the path of an arriving content. d must have been
// parsed.
func (s *Store) partialPath(d digest.Digest) string {
	return filepath.Join(s.root, "partial", d.Encoded())
}

// Path returns the path of the complete content d, which exists only if
// Has(d). Callers must treat the file as read-only.
func (s *Store) Path(d digest.Digest) (string, error) {
	d, err := parse(d)
	if err != nil {
		return "", err
	}
	return s.path(d), nil
}

// DataDir is the directory of the complete contents, as an overlayfs
// data-only layer: DataPath names a content in it.
func (s *Store) DataDir() string { return filepath.Join(s.root, "content") }

// DataPath returns the path of the complete content d inside DataDir,
// starting with "/", for the trusted.overlay.redirect of a metadata-only
// file. It is short ("/ab/" and 20 more hex digits of the digest, 24
// bytes, a second name of the content made here): with the metacopy
// xattr it fits in an ext4 inode's own xattr space, where a redirect to
// content/sha256/ab/<64 hex> would take a block of its own per file, read
// by every cold stat. If that short name is another content's (88 bits of
// the digest), the full path is returned.
func (s *Store) DataPath(d digest.Digest) (string, error) {
	d, err := parse(d)
	if err != nil {
		return "", err
	}
	long := s.path(d)
	fi, err := os.Lstat(long)
	if err != nil {
		return "", fmt.Errorf("%w: %s is not complete", ErrNotFound, d)
	}
	rel := s.shortName(d)
	short := filepath.Join(s.DataDir(), rel)
	for range 2 {
		if sfi, err := os.Lstat(short); err == nil {
			if os.SameFile(fi, sfi) {
				return rel, nil
			}
			return "/" + filepath.Join("sha256", d.Encoded()[:2], d.Encoded()), nil
		}
		if err := os.MkdirAll(filepath.Dir(short), 0o700); err != nil {
			return "", err
		}
		if err := os.Link(long, short); err == nil {
			return rel, nil
		} else if !errors.Is(err, os.ErrExist) {
			return "", err
		}
	}
	return "", fmt.Errorf("short name %s of %s keeps changing", rel, d)
}

// shortName is DataPath's short name of d.
func (s *Store) shortName(d digest.Digest) string {
	hex := d.Encoded()
	return "/" + hex[:2] + "/" + hex[2:22]
}

// removeShortName removes the short name of d, if it names the file at
// p (which must still exist).
func (s *Store) removeShortName(d digest.Digest, p string) {
	short := filepath.Join(s.DataDir(), s.shortName(d))
	fi, err := os.Lstat(p)
	if err != nil {
		return
	}
	if sfi, err := os.Lstat(short); err == nil && os.SameFile(fi, sfi) {
		os.Remove(short)
	}
}

// Has reports whether the content d is complete and verified.
func (s *Store) Has(d digest.Digest) bool {
	d, err := parse(d)
	if err != nil {
		return false
	}
	fi, err := os.Lstat(s.path(d))
	return err == nil && fi.Mode().IsRegular()
}

// HasChunk reports whether the chunk of d at offset is in: the content is
// complete, or that chunk of it arrived and was verified. A resumed bundle
// starts at its first frame whose chunk is not in.
func (s *Store) HasChunk(d digest.Digest, offset int64) bool {
	d, err := parse(d)
	if err != nil {
		return false
	}
	s.mu.Lock()
	c, ok := s.pending[d]
	if ok {
		defer s.mu.Unlock()
		i := c.chunkIndex(offset)
		return c.err == nil && i >= 0 && c.have[i]
	}
	s.mu.Unlock()
	return s.Has(d)
}

// Open opens the complete content d for reading. It fails with an error
// wrapping ErrNotFound if the content is not complete.
func (s *Store) Open(d digest.Digest) (*os.File, error) {
	d, err := parse(d)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(s.path(d))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s is not complete", ErrNotFound, d)
	}
	return f, err
}

// checkChunks validates a content's chunk list: contiguous, covering
// [0, size), with sha256 digests. An empty list means one chunk.
func checkChunks(d digest.Digest, size int64, chunks []api.Chunk) ([]api.Chunk, error) {
	if len(chunks) == 0 {
		return []api.Chunk{{Offset: 0, Size: size, Digest: d.String()}}, nil
	}
	var next int64
	for i, c := range chunks {
		if c.Offset != next || c.Size <= 0 {
			return nil, fmt.Errorf("%w: %s: chunk %d does not continue the content", ErrMismatch, d, i)
		}
		if _, err := api.ParseDigest(c.Digest); err != nil {
			return nil, fmt.Errorf("%s: chunk %d: %w", d, i, err)
		}
		next += c.Size
	}
	if next != size {
		return nil, fmt.Errorf("%w: %s: chunks cover %d of %d bytes", ErrMismatch, d, next, size)
	}
	return append([]api.Chunk(nil), chunks...), nil
}

func sameLayout(a, b []api.Chunk) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Offset != b[i].Offset || a[i].Size != b[i].Size || a[i].Digest != b[i].Digest {
			return false
		}
	}
	return true
}

// Expect registers a content that is going to arrive, of the given size and
// chunk layout (nil chunks: one chunk covering the whole content). It is
// idempotent and a no-op for a complete content. Expecting a failed content
// again re-arms it, for a new attempt.
func (s *Store) Expect(d digest.Digest, size int64, chunks []api.Chunk) error {
	return s.expect(d, size, chunks, nil, true)
}

// expect is Expect. partials, if not nil, names every file of partial/
// (listed once for many contents), so that a content with no partial file
// costs no lookup. Without rearm, a failed content stays failed and its
// error is returned.
func (s *Store) expect(d digest.Digest, size int64, chunks []api.Chunk, partials map[string]bool, rearm bool) error {
	d, err := parse(d)
	if err != nil {
		return err
	}
	if size < 0 {
		return fmt.Errorf("%w: %s: negative size", ErrMismatch, d)
	}
	if size == 0 {
		return s.putEmpty(d)
	}
	chunks, err = checkChunks(d, size, chunks)
	if err != nil {
		return err
	}

	s.expectMu.Lock()
	defer s.expectMu.Unlock()
	s.mu.Lock()
	if c, ok := s.pending[d]; ok && c.err == nil {
		s.mu.Unlock()
		if c.size != size || !sameLayout(c.chunks, chunks) {
			return fmt.Errorf("%w: %s expected again with another size or chunk layout", ErrMismatch, d)
		}
		return nil
	} else if ok && !rearm {
		err := c.err
		s.mu.Unlock()
		return err
	}
	s.mu.Unlock()
	if s.Has(d) {
		return nil
	}

	// Prepare outside the lock: re-verifying a partial file left by an
	// earlier run reads it.
	c, err := s.newContent(d, size, chunks, partials == nil || partials[d.Encoded()])
	if err != nil {
		return err
	}

	s.mu.Lock()
	if old, ok := s.pending[d]; ok {
		// Wake the readers of the failed attempt; they already hold
		// its error.
		old.broadcast()
	}
	s.pending[d] = c
	done := c.missing == 0
	if done {
		c.finishing = true
	}
	s.mu.Unlock()
	if done {
		return s.finish(c)
	}
	return nil
}

// newContent prepares the state of d. A partial file of the right size
// left by an earlier run is opened and the chunks in it that verify count
// as arrived; otherwise the partial file is created by the first chunk
// written (openPartial), so that expecting the thousands of contents of an
// image costs no file creation before the image is usable.
func (s *Store) newContent(d digest.Digest, size int64, chunks []api.Chunk, mayHavePartial bool) (*content, error) {
	c := &content{
		d:       d,
		size:    size,
		chunks:  chunks,
		have:    make([]bool, len(chunks)),
		busy:    make([]bool, len(chunks)),
		missing: len(chunks),
		changed: make(chan struct{}),
		hash:    sha256.New(),
	}
	if !mayHavePartial {
		return c, nil
	}
	path := s.partialPath(d)
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return c, nil
	case err != nil:
		return nil, fmt.Errorf("preparing content %s: %w", d, s.storageError(err))
	case !fi.Mode().IsRegular() || fi.Size() != size:
		// Not ours to keep.
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("preparing content %s: %w", d, s.storageError(err))
		}
		return c, nil
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("preparing content %s: %w", d, s.storageError(err))
	}
	for i, ch := range chunks {
		if verifyChunk(f, ch) {
			c.have[i] = true
			c.missing--
		}
	}
	c.f = f
	return c, nil
}

// openPartialLocked creates the partial file of c for its first chunk. s.mu
// must be held, and c must be pending and not failed.
func (s *Store) openPartialLocked(c *content) error {
	// Never truncate to 0 here: on ext4 a truncation to 0 makes the next
	// close flush the file (auto_da_alloc), a synchronous write per
	// content. Stale bytes of a file left over would never be read: only
	// chunks written since are readable, and they make up the whole file
	// before it is verified.
	f, err := os.OpenFile(s.partialPath(c.d), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("creating partial content %s: %w", c.d, s.storageError(err))
	}
	if err := f.Truncate(c.size); err != nil {
		f.Close()
		os.Remove(f.Name())
		return fmt.Errorf("creating partial content %s: %w", c.d, s.storageError(err))
	}
	c.f = f
	return nil
}

func verifyChunk(f *os.File, ch api.Chunk) bool {
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, ch.Offset, ch.Size)); err != nil {
		return false
	}
	return digest.NewDigest(digest.SHA256, h).String() == ch.Digest
}

// putEmpty stores the empty content.
func (s *Store) putEmpty(d digest.Digest) error {
	if d != emptyDigest {
		return fmt.Errorf("%w: %s has size 0 but is not the digest of empty content", ErrMismatch, d)
	}
	if s.Has(d) {
		return nil
	}
	p := s.path(d)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("storing empty content: %w", s.storageError(err))
	}
	if err := os.WriteFile(p, nil, 0o444); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("storing empty content: %w", s.storageError(err))
	}
	return nil
}

// ExpectHeader registers every content the frames of a bundle header carry,
// with the size given by the layer entries. Call it before the layers are
// mounted, so that reads block until their content arrives instead of
// failing with ErrNotFound.
//
// The chunk layout is the one of the frames (the registry picks the layout
// it sends when two layers store the same content with different chunk
// sizes); the first entry's chunks are the fallback.
func (s *Store) ExpectHeader(h *api.BundleHeader) error {
	return s.expectHeader(h, true)
}

// expectHeader is ExpectHeader; without rearm, a content that failed
// stays failed and fails the call.
func (s *Store) expectHeader(h *api.BundleHeader, rearm bool) error {
	// One listing of partial/ instead of a lookup per content: it is
	// empty unless an earlier pull was interrupted.
	dirents, err := os.ReadDir(filepath.Join(s.root, "partial"))
	if err != nil {
		return fmt.Errorf("listing partial contents: %w", s.storageError(err))
	}
	partials := make(map[string]bool, len(dirents))
	for _, de := range dirents {
		partials[de.Name()] = true
	}
	frames := make(map[string][]api.Chunk)
	for _, f := range h.Frames {
		frames[f.Digest] = append(frames[f.Digest], api.Chunk{Offset: f.Offset, Size: f.Size, Digest: f.ChunkDigest})
	}
	for i := range h.Layers {
		for j := range h.Layers[i].Entries {
			e := &h.Layers[i].Entries[j]
			fc, ok := frames[e.Digest]
			if e.Type != api.TypeReg || !ok {
				continue
			}
			chunks := framesLayout(fc)
			if _, err := checkChunks(digest.Digest(e.Digest), e.Size, chunks); err != nil {
				chunks = e.Chunks
			}
			if err := s.expect(digest.Digest(e.Digest), e.Size, chunks, partials, rearm); err != nil {
				return fmt.Errorf("layer %s: %s: %w", h.Layers[i].Digest, e.Name, err)
			}
			delete(frames, e.Digest)
		}
	}
	for d := range frames {
		return fmt.Errorf("%w: bundle frames carry content %s that no entry lists", ErrMismatch, d)
	}
	return nil
}

// framesLayout sorts the chunks a bundle's frames carry and drops
// duplicates.
func framesLayout(chunks []api.Chunk) []api.Chunk {
	sort.Slice(chunks, func(i, j int) bool { return chunks[i].Offset < chunks[j].Offset })
	out := chunks[:0]
	for _, c := range chunks {
		if len(out) > 0 && out[len(out)-1] == c {
			continue
		}
		out = append(out, c)
	}
	return out
}

// chunkIndex returns the index of the chunk starting at off, or -1.
func (c *content) chunkIndex(off int64) int {
	i := sort.Search(len(c.chunks), func(i int) bool { return c.chunks[i].Offset >= off })
	if i < len(c.chunks) && c.chunks[i].Offset == off {
		return i
	}
	return -1
}

// covered reports whether every chunk overlapping [off, end) is in.
func (c *content) covered(off, end int64) bool {
	i := sort.Search(len(c.chunks), func(i int) bool { return c.chunks[i].Offset+c.chunks[i].Size > off })
	for ; i < len(c.chunks) && c.chunks[i].Offset < end; i++ {
		if !c.have[i] {
			return false
		}
	}
	return true
}

// WriteChunk writes one chunk of an expected content. data is the output of
// bundle.Decode, which reports a digest mismatch at its end: the chunk
// becomes readable only once data reached EOF without error. When the last
// chunk is in, the whole content is verified and made complete; if it does
// not match its digest it is deleted and failed.
//
// A chunk that is already in, or of a complete content, is skipped without
// reading data.
func (s *Store) WriteChunk(f api.Frame, data io.Reader) error {
	_, err := s.writeChunk(f, data)
	return err
}

// writeChunk is WriteChunk, and also reports whether this chunk completed
// its content.
func (s *Store) writeChunk(f api.Frame, data io.Reader) (completed bool, err error) {
	d, err := api.ParseDigest(f.Digest)
	if err != nil {
		return false, err
	}
	s.mu.Lock()
	c, ok := s.pending[d]
	if !ok {
		s.mu.Unlock()
		if s.Has(d) {
			return false, nil
		}
		return false, fmt.Errorf("%w: chunk of %s, which is not expected", ErrNotFound, d)
	}
	i := c.chunkIndex(f.Offset)
	if i < 0 || c.chunks[i].Size != f.Size || c.chunks[i].Digest != f.ChunkDigest {
		s.mu.Unlock()
		return false, fmt.Errorf("%w: frame %s@%d (%d bytes, %s) matches no chunk of the content", ErrMismatch, d, f.Offset, f.Size, f.ChunkDigest)
	}
	// Another bundle may be writing the same chunk: wait for it, then
	// skip the chunk if it made it.
	for c.busy[i] && c.err == nil {
		ch := c.changed
		s.mu.Unlock()
		<-ch
		s.mu.Lock()
	}
	if c.err != nil {
		err := c.err
		s.mu.Unlock()
		return false, err
	}
	if c.have[i] || c.finishing {
		s.mu.Unlock()
		return false, nil
	}
	if c.f == nil {
		if err := s.openPartialLocked(c); err != nil {
			s.mu.Unlock()
			return false, err
		}
	}
	ch := c.chunks[i]
	c.busy[i] = true
	file := c.f
	// Take the running hash if this chunk continues the hashed prefix.
	var h hash.Hash
	var snapshot []byte
	if !c.hashBusy && c.hashed == ch.Offset {
		if m, ok := c.hash.(encoding.BinaryMarshaler); ok {
			if snapshot, err = m.MarshalBinary(); err == nil {
				c.hashBusy = true
				h = c.hash
			}
		}
	}
	s.mu.Unlock()

	w := &sectionWriter{s: s, f: file, off: ch.Offset, left: ch.Size}
	var dst io.Writer = w
	if h != nil {
		dst = io.MultiWriter(w, h)
	}
	n, err := io.Copy(dst, data)
	if err == nil && n != ch.Size {
		err = fmt.Errorf("%w: chunk %s@%d: got %d of %d bytes", ErrMismatch, d, ch.Offset, n, ch.Size)
	}

	s.mu.Lock()
	c.busy[i] = false
	if h != nil {
		c.hashBusy = false
		if err == nil {
			c.hashed += ch.Size
		} else if uerr := c.hash.(encoding.BinaryUnmarshaler).UnmarshalBinary(snapshot); uerr != nil {
			// Cannot happen for sha256; restart the hash from 0.
			c.hash, c.hashed = sha256.New(), 0
		}
	}
	if err != nil {
		c.broadcast()
		if c.err != nil {
			err = fmt.Errorf("%w (%v)", c.err, err)
		}
		s.mu.Unlock()
		return false, fmt.Errorf("writing chunk %s@%d: %w", d, ch.Offset, err)
	}
	if c.err != nil {
		// Failed while we were writing; its partial file is gone.
		err := c.err
		s.mu.Unlock()
		return false, err
	}
	c.have[i] = true
	c.missing--
	c.broadcast()
	finish := c.missing == 0 && !c.finishing
	if finish {
		c.finishing = true
	}
	s.mu.Unlock()
	if finish {
		return true, s.finish(c)
	}
	return false, nil
}

// sectionWriter writes at most left bytes at off of f: a chunk never spills
// into its neighbour, whatever the decoder yields.
type sectionWriter struct {
	s    *Store
	f    *os.File
	off  int64
	left int64
}

func (w *sectionWriter) Write(p []byte) (int, error) {
	if int64(len(p)) > w.left {
		return 0, fmt.Errorf("%w: chunk data exceeds its size", ErrMismatch)
	}
	n, err := w.f.WriteAt(p, w.off)
	w.off += int64(n)
	w.left -= int64(n)
	if err != nil {
		err = w.s.storageError(err)
	}
	return n, err
}

// finish verifies a content whose chunks are all in and renames it into
// content/. The caller set c.finishing, so no writer touches c.f or c.hash.
func (s *Store) finish(c *content) error {
	s.mu.Lock()
	f, h, hashed := c.f, c.hash, c.hashed
	s.mu.Unlock()
	if f == nil {
		return c.failure()
	}
	if _, err := io.Copy(h, io.NewSectionReader(f, hashed, c.size-hashed)); err != nil {
		s.fail(c, fmt.Errorf("verifying: %w", s.storageError(err)))
		return c.failure()
	}
	if got := digest.NewDigest(digest.SHA256, h); got != c.d {
		s.fail(c, fmt.Errorf("%w: whole content has digest %s", ErrMismatch, got))
		return c.failure()
	}
	// No fsync here: it costs about a millisecond per content, seconds
	// for an image of thousands of files. Durability is paid once per
	// layer instead (Sync before a layer is recorded complete), and an
	// unclean shutdown makes the next Open re-verify every content.
	if err := f.Chmod(0o444); err != nil {
		s.fail(c, fmt.Errorf("making read-only: %w", s.storageError(err)))
		return c.failure()
	}
	final := s.path(c.d)
	if err := os.MkdirAll(filepath.Dir(final), 0o700); err != nil {
		s.fail(c, s.storageError(err))
		return c.failure()
	}

	// Rename under the lock so a concurrent Fail or Remove either comes
	// first (and the rename does not happen) or sees a complete content.
	s.mu.Lock()
	if c.err != nil {
		s.mu.Unlock()
		return c.err
	}
	if err := os.Rename(s.partialPath(c.d), final); err != nil {
		s.failLocked(c, fmt.Errorf("renaming into the store: %w", s.storageError(err)))
		s.mu.Unlock()
		return c.failure()
	}
	delete(s.pending, c.d)
	c.f = nil
	c.broadcast()
	s.mu.Unlock()

	// Readers still holding f get os.ErrClosed and retry on the final file.
	f.Close()
	return nil
}

// uncleanMarker exists while a Store is open, holding the boot ID: finding
// it at Open with another boot ID means the machine went down while a
// Store was open, so contents renamed into place since the last Sync may
// not have reached the disk.
const uncleanMarker = "unclean"

// Sync makes every content written so far durable (syncfs of the store's
// filesystem). Callers sync before they record anything that relies on
// contents being on disk, such as a layer being complete.
func (s *Store) Sync() error {
	d, err := os.Open(s.root)
	if err != nil {
		return fmt.Errorf("syncing store: %w", err)
	}
	defer d.Close()
	if err := unix.Syncfs(int(d.Fd())); err != nil {
		return fmt.Errorf("syncing store: %w", err)
	}
	return nil
}

// Close syncs the store and records a clean shutdown.
func (s *Store) Close() error {
	if err := s.Sync(); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(s.root, uncleanMarker)); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("closing store: %w", err)
	}
	return nil
}

// verifyContents re-hashes every complete content and removes the ones
// that do not match their digest (torn by a crash before they were
// synced). It returns how many it removed.
func (s *Store) verifyContents() (int, error) {
	removed := 0
	base := filepath.Join(s.root, "content", "sha256")
	err := filepath.WalkDir(base, func(path string, de fs.DirEntry, err error) error {
		if err != nil || de.IsDir() {
			return err
		}
		d, perr := parse(digest.NewDigestFromEncoded(digest.SHA256, de.Name()))
		if perr != nil || s.path(d) != path {
			removed++
			return os.Remove(path)
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		h := digest.SHA256.Digester()
		if _, err := io.Copy(h.Hash(), f); err != nil {
			return err
		}
		if h.Digest() != d {
			removed++
			s.removeShortName(d, path)
			return os.Remove(path)
		}
		return nil
	})
	return removed, err
}

func (c *content) failure() error {
	if c.err != nil {
		return c.err
	}
	return fmt.Errorf("%w: %s", ErrFailed, c.d)
}

// Fail marks the pending content d as failed: its readers, present and
// future, get an error wrapping ErrFailed and err, and what arrived of it
// is deleted. It is a no-op for a complete or unknown content.
func (s *Store) Fail(d digest.Digest, err error) {
	d, perr := parse(d)
	if perr != nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if c, ok := s.pending[d]; ok {
		s.failLocked(c, err)
	}
}

// FailPending fails every content that has not completed, e.g. when a
// bundle failed for good.
func (s *Store) FailPending(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.pending {
		s.failLocked(c, err)
	}
}

func (s *Store) fail(c *content, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failLocked(c, err)
}

func (s *Store) failLocked(c *content, err error) {
	if c.err != nil || s.pending[c.d] != c {
		return
	}
	c.err = fmt.Errorf("%w: %s: %w", ErrFailed, c.d, err)
	if c.f != nil {
		c.f.Close()
		c.f = nil
	}
	// Under the lock, so a re-Expect cannot create the new partial file
	// before this removes the old one.
	os.Remove(s.partialPath(c.d))
	c.broadcast()
}

// Remove deletes the content d, complete or not. Readers of a pending
// content get an error wrapping ErrFailed.
func (s *Store) Remove(d digest.Digest) error {
	d, err := parse(d)
	if err != nil {
		return err
	}
	s.mu.Lock()
	if c, ok := s.pending[d]; ok {
		s.failLocked(c, errors.New("removed"))
		delete(s.pending, d)
	}
	s.mu.Unlock()
	s.removeShortName(d, s.path(d))
	if err := os.Remove(s.path(d)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing %s: %w", d, err)
	}
	return nil
}

// ReadAt reads len(p) bytes of the content d at off, like io.ReaderAt. It
// blocks until the chunks that cover the range have arrived and been
// verified, ctx is done (ctx.Err() is returned) or the content failed (an
// error wrapping ErrFailed). A read past the end returns io.EOF. The first
// time it has to wait it tells the demand handler, if any.
func (s *Store) ReadAt(ctx context.Context, d digest.Digest, p []byte, off int64) (int, error) {
	d, err := parse(d)
	if err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, fmt.Errorf("reading %s: negative offset", d)
	}
	demanded := false
	for {
		s.mu.Lock()
		c, ok := s.pending[d]
		if !ok {
			s.mu.Unlock()
			return s.readComplete(d, p, off)
		}
		if c.err != nil {
			s.mu.Unlock()
			return 0, c.err
		}
		if off >= c.size {
			s.mu.Unlock()
			return 0, io.EOF
		}
		end := min(off+int64(len(p)), c.size)
		if c.covered(off, end) {
			f := c.f
			s.mu.Unlock()
			n, err := f.ReadAt(p[:end-off], off)
			if errors.Is(err, os.ErrClosed) {
				// Completed (or failed) meanwhile: look again.
				continue
			}
			if err == nil && n < len(p) {
				err = io.EOF
			}
			return n, err
		}
		var demand []api.Chunk
		if s.demand != nil && !demanded {
			demanded = true
			demand = c.demandLocked(off, end)
		}
		changed := c.changed
		s.mu.Unlock()
		if len(demand) > 0 {
			s.demand(Demand{Digest: d, Chunks: demand})
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

func (s *Store) readComplete(d digest.Digest, p []byte, off int64) (int, error) {
	f, err := s.Open(d)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return f.ReadAt(p, off)
}

// Wait blocks until the content d is complete, ctx is done or the content
// failed.
func (s *Store) Wait(ctx context.Context, d digest.Digest) error {
	d, err := parse(d)
	if err != nil {
		return err
	}
	for {
		s.mu.Lock()
		c, ok := s.pending[d]
		if !ok {
			s.mu.Unlock()
			if s.Has(d) {
				return nil
			}
			return fmt.Errorf("%w: %s", ErrNotFound, d)
		}
		if c.err != nil {
			s.mu.Unlock()
			return c.err
		}
		changed := c.changed
		s.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Pending returns the number of contents expected and not complete,
// failed ones included.
func (s *Store) Pending() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.pending)
}
