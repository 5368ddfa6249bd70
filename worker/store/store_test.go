package store

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
)

// testContent is a file content cut into chunks, with each chunk's frame
// and raw gzip member, as a registry would send them.
type testContent struct {
	data   []byte
	d      digest.Digest
	chunks []api.Chunk
	frames []api.Frame
	raw    [][]byte
}

func gz(t testing.TB, p []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	if _, err := w.Write(p); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func newContent(t testing.TB, seed int64, size, chunkSize int) *testContent {
	t.Helper()
	data := make([]byte, size)
	rand.New(rand.NewSource(seed)).Read(data)
	c := &testContent{data: data, d: digest.FromBytes(data)}
	for off := 0; off < size; off += chunkSize {
		p := data[off:min(off+chunkSize, size)]
		ch := api.Chunk{Offset: int64(off), Size: int64(len(p)), Digest: digest.FromBytes(p).String()}
		raw := gz(t, p)
		c.chunks = append(c.chunks, ch)
		c.raw = append(c.raw, raw)
		c.frames = append(c.frames, api.Frame{
			Digest: c.d.String(), Offset: ch.Offset, Size: ch.Size,
			ChunkDigest: ch.Digest, CompressedSize: int64(len(raw)),
		})
	}
	return c
}

func (c *testContent) entry(name string) api.Entry {
	return api.Entry{Name: name, Type: api.TypeReg, Mode: 0o644, Size: int64(len(c.data)), Digest: c.d.String(), Chunks: c.chunks}
}

// write delivers chunk i through bundle.Decode, as Receive does.
func (c *testContent) write(t testing.TB, s *Store, i int) error {
	t.Helper()
	data, err := bundle.Decode(c.frames[i], bytes.NewReader(c.raw[i]))
	if err != nil {
		t.Fatal(err)
	}
	return s.WriteChunk(c.frames[i], data)
}

func openStore(t testing.TB) *Store {
	t.Helper()
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// contentFiles lists the files under content/, which must only ever hold
// verified contents.
func contentFiles(t testing.TB, s *Store) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(filepath.Join(s.Root(), "content"), func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			files = append(files, p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

func readAll(t testing.TB, s *Store, d digest.Digest, size int) []byte {
	t.Helper()
	p := make([]byte, size)
	n, err := s.ReadAt(context.Background(), d, p, 0)
	if err != nil && !(errors.Is(err, io.EOF) && n == size) {
		t.Fatalf("ReadAt: %d, %v", n, err)
	}
	return p[:n]
}

// blocked reports whether a read of [off, off+n) is still waiting: it gives
// the read a short deadline and expects the deadline to be what ends it.
func blocked(t testing.TB, s *Store, d digest.Digest, off, n int64) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := s.ReadAt(ctx, d, make([]byte, n), off)
	return errors.Is(err, context.DeadlineExceeded)
}

func TestOutOfOrderChunks(t *testing.T) {
	s := openStore(t)
	c := newContent(t, 1, 10_000, 3000) // 4 chunks, the last one short
	if err := s.Expect(c.d, int64(len(c.data)), c.chunks); err != nil {
		t.Fatal(err)
	}
	if err := s.Expect(c.d, int64(len(c.data)), c.chunks); err != nil {
		t.Fatalf("Expect is not idempotent: %v", err)
	}
	for _, i := range []int{3, 1, 0} {
		if err := c.write(t, s, i); err != nil {
			t.Fatalf("chunk %d: %v", i, err)
		}
	}
	// Arrived chunks are readable before the content is complete.
	got := make([]byte, 3000)
	if _, err := s.ReadAt(context.Background(), c.d, got, 3000); err != nil || !bytes.Equal(got, c.data[3000:6000]) {
		t.Fatalf("reading arrived chunk 1: %v", err)
	}
	if s.Has(c.d) || len(contentFiles(t, s)) != 0 {
		t.Fatal("incomplete content is in content/")
	}
	if !blocked(t, s, c.d, 5000, 2000) {
		t.Fatal("read overlapping a missing chunk did not block")
	}
	if err := c.write(t, s, 2); err != nil {
		t.Fatal(err)
	}
	if !s.Has(c.d) {
		t.Fatal("complete content not in store")
	}
	if got := readAll(t, s, c.d, len(c.data)); !bytes.Equal(got, c.data) {
		t.Fatal("content differs")
	}
	f, err := s.Open(c.d)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if got, _ := io.ReadAll(f); !bytes.Equal(got, c.data) {
		t.Fatal("opened content differs")
	}
	// A chunk of a complete content is skipped.
	if err := c.write(t, s, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(s.Root(), "partial", c.d.Encoded())); !os.IsNotExist(err) {
		t.Fatalf("partial file left behind: %v", err)
	}
}

func TestReadEOF(t *testing.T) {
	s := openStore(t)
	c := newContent(t, 2, 100, 100)
	if err := s.Expect(c.d, 100, c.chunks); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ReadAt(context.Background(), c.d, make([]byte, 1), 100); err != io.EOF {
		t.Fatalf("read at end of pending content: %v, want EOF", err)
	}
	if err := c.write(t, s, 0); err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 200)
	n, err := s.ReadAt(context.Background(), c.d, p, 50)
	if n != 50 || err != io.EOF || !bytes.Equal(p[:n], c.data[50:]) {
		t.Fatalf("short read at the end: %d, %v", n, err)
	}
}

func TestWaiterUnblocksOnArrival(t *testing.T) {
	s := openStore(t)
	c := newContent(t, 3, 8192, 4096)
	if err := s.Expect(c.d, 8192, c.chunks); err != nil {
		t.Fatal(err)
	}
	type result struct {
		p   []byte
		err error
	}
	read := make(chan result, 1)
	go func() {
		p := make([]byte, 100)
		_, err := s.ReadAt(context.Background(), c.d, p, 5000)
		read <- result{p, err}
	}()
	waited := make(chan error, 1)
	go func() { waited <- s.Wait(context.Background(), c.d) }()

	if err := c.write(t, s, 1); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-read:
		if r.err != nil || !bytes.Equal(r.p, c.data[5000:5100]) {
			t.Fatalf("read after arrival: %v", r.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("reader not woken by the arrival of its chunk")
	}
	if err := c.write(t, s, 0); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-waited:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Wait not woken by completion")
	}
}

func TestWaiterCancel(t *testing.T) {
	s := openStore(t)
	c := newContent(t, 4, 100, 100)
	if err := s.Expect(c.d, 100, c.chunks); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 2)
	go func() {
		_, err := s.ReadAt(ctx, c.d, make([]byte, 10), 0)
		done <- err
	}()
	go func() { done <- s.Wait(ctx, c.d) }()
	cancel()
	for range 2 {
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("got %v, want context.Canceled", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("waiter not released by cancellation")
		}
	}
}

func TestCorruptChunk(t *testing.T) {
	s := openStore(t)
	c := newContent(t, 5, 200, 100)
	if err := s.Expect(c.d, 200, c.chunks); err != nil {
		t.Fatal(err)
	}
	// A frame that announces chunk 0 but carries other bytes: Decode
	// reports the mismatch only at its end, after the data was written.
	bad := bytes.Repeat([]byte{'x'}, 100)
	data, err := bundle.Decode(c.frames[0], bytes.NewReader(gz(t, bad)))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.WriteChunk(c.frames[0], data); !errors.Is(err, bundle.ErrCorrupt) {
		t.Fatalf("WriteChunk of a corrupt chunk: %v, want ErrCorrupt", err)
	}
	if !blocked(t, s, c.d, 0, 10) {
		t.Fatal("corrupt chunk became readable")
	}
	// A frame whose announced chunk is not the content's.
	f := c.frames[0]
	f.ChunkDigest = digest.FromBytes(bad).String()
	data, _ = bundle.Decode(f, bytes.NewReader(gz(t, bad)))
	if err := s.WriteChunk(f, data); !errors.Is(err, ErrMismatch) {
		t.Fatalf("WriteChunk of a foreign chunk: %v, want ErrMismatch", err)
	}
	if err := c.write(t, s, 1); err != nil {
		t.Fatal(err)
	}
	if !blocked(t, s, c.d, 0, 10) || s.Has(c.d) || len(contentFiles(t, s)) != 0 {
		t.Fatal("content with a corrupt chunk became readable")
	}
	// The good chunk repairs it.
	if err := c.write(t, s, 0); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, s, c.d, 200); !bytes.Equal(got, c.data) {
		t.Fatal("content differs after repair")
	}
}

func TestWholeFileMismatch(t *testing.T) {
	s := openStore(t)
	c := newContent(t, 6, 300, 100)
	// Every chunk verifies, but the content digest is another one.
	wrong := digest.FromString("something else")
	for i := range c.frames {
		c.frames[i].Digest = wrong.String()
	}
	if err := s.Expect(wrong, 300, c.chunks); err != nil {
		t.Fatal(err)
	}
	for i := range c.frames[:2] {
		if err := c.write(t, s, i); err != nil {
			t.Fatal(err)
		}
	}
	err := c.write(t, s, 2)
	if !errors.Is(err, ErrFailed) || !errors.Is(err, ErrMismatch) {
		t.Fatalf("last chunk: %v, want ErrFailed and ErrMismatch", err)
	}
	if s.Has(wrong) || len(contentFiles(t, s)) != 0 {
		t.Fatal("mismatching content is in content/")
	}
	if _, err := os.Stat(filepath.Join(s.Root(), "partial", wrong.Encoded())); !os.IsNotExist(err) {
		t.Fatalf("mismatching partial file left behind: %v", err)
	}
	if _, err := s.ReadAt(context.Background(), wrong, make([]byte, 10), 0); !errors.Is(err, ErrFailed) {
		t.Fatalf("read of a failed content: %v, want ErrFailed", err)
	}
	if err := s.Wait(context.Background(), wrong); !errors.Is(err, ErrFailed) {
		t.Fatalf("Wait on a failed content: %v, want ErrFailed", err)
	}
}

func TestFail(t *testing.T) {
	s := openStore(t)
	a := newContent(t, 7, 100, 100)
	b := newContent(t, 8, 100, 100)
	for _, c := range []*testContent{a, b} {
		if err := s.Expect(c.d, 100, c.chunks); err != nil {
			t.Fatal(err)
		}
	}
	read := make(chan error, 1)
	go func() {
		_, err := s.ReadAt(context.Background(), a.d, make([]byte, 10), 0)
		read <- err
	}()
	cause := errors.New("registry gone")
	s.Fail(a.d, cause)
	select {
	case err := <-read:
		if !errors.Is(err, ErrFailed) || !errors.Is(err, cause) {
			t.Fatalf("got %v, want ErrFailed wrapping the cause", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("reader not released by Fail")
	}
	s.FailPending(cause)
	if _, err := s.ReadAt(context.Background(), b.d, make([]byte, 10), 0); !errors.Is(err, ErrFailed) {
		t.Fatalf("after FailPending: %v", err)
	}
	// A new attempt re-arms a failed content.
	if err := s.Expect(a.d, 100, a.chunks); err != nil {
		t.Fatal(err)
	}
	if err := a.write(t, s, 0); err != nil {
		t.Fatal(err)
	}
	if !s.Has(a.d) {
		t.Fatal("re-armed content did not complete")
	}
}

func TestBadDigests(t *testing.T) {
	s := openStore(t)
	good := digest.FromString("x").Encoded()
	bad := []digest.Digest{
		"sha256:../..",
		"sha256:../../../../etc/passwd",
		"sha256:" + digest.Digest(good[:63]),
		"sha256:" + digest.Digest(good) + "00",
		"sha256:" + digest.Digest(bytes.ToUpper([]byte(good))),
		"sha512:" + digest.Digest(good+good),
		"md5:d41d8cd98f00b204e9800998ecf8427e",
		digest.Digest(good),
		"",
	}
	for _, d := range bad {
		t.Run(string(d), func(t *testing.T) {
			if err := s.Expect(d, 1, nil); err == nil {
				t.Error("Expect accepted it")
			}
			if s.Has(d) {
				t.Error("Has accepted it")
			}
			if _, err := s.ReadAt(context.Background(), d, make([]byte, 1), 0); err == nil {
				t.Error("ReadAt accepted it")
			}
			if err := s.Wait(context.Background(), d); err == nil {
				t.Error("Wait accepted it")
			}
			if _, err := s.Open(d); err == nil {
				t.Error("Open accepted it")
			}
			if err := s.Remove(d); err == nil {
				t.Error("Remove accepted it")
			}
			f := api.Frame{Digest: string(d), Size: 1, ChunkDigest: string(d), CompressedSize: 1}
			if err := s.WriteChunk(f, bytes.NewReader([]byte{0})); err == nil {
				t.Error("WriteChunk accepted it")
			}
		})
	}
	// Chunk digests are checked too.
	c := newContent(t, 9, 10, 10)
	c.chunks[0].Digest = "sha256:../../x"
	if err := s.Expect(c.d, 10, c.chunks); err == nil {
		t.Error("Expect accepted a bad chunk digest")
	}
	entries, _ := os.ReadDir(filepath.Join(s.Root(), "partial"))
	if len(entries) != 0 || len(contentFiles(t, s)) != 0 {
		t.Error("rejected digests left files behind")
	}
}

func TestExpectValidatesLayout(t *testing.T) {
	s := openStore(t)
	c := newContent(t, 10, 300, 100)
	for name, chunks := range map[string][]api.Chunk{
		"gap":      {c.chunks[0], c.chunks[2]},
		"short":    c.chunks[:2],
		"overlap":  {c.chunks[0], {Offset: 50, Size: 250, Digest: c.chunks[1].Digest}},
		"zerosize": {{Offset: 0, Size: 0, Digest: c.chunks[0].Digest}, {Offset: 0, Size: 300, Digest: c.chunks[0].Digest}},
	} {
		if err := s.Expect(c.d, 300, chunks); !errors.Is(err, ErrMismatch) {
			t.Errorf("%s: %v, want ErrMismatch", name, err)
		}
	}
	if err := s.Expect(c.d, 300, c.chunks); err != nil {
		t.Fatal(err)
	}
	if err := s.Expect(c.d, 300, nil); !errors.Is(err, ErrMismatch) {
		t.Errorf("re-Expect with another layout: %v, want ErrMismatch", err)
	}
}

func TestEmptyContent(t *testing.T) {
	s := openStore(t)
	if err := s.Expect(emptyDigest, 0, nil); err != nil {
		t.Fatal(err)
	}
	if !s.Has(emptyDigest) {
		t.Fatal("empty content not stored")
	}
	if err := s.Expect(digest.FromString("x"), 0, nil); err == nil {
		t.Fatal("accepted a size-0 content with another digest")
	}
}

func TestRestartKeepsVerifiedChunks(t *testing.T) {
	root := t.TempDir()
	s, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	c := newContent(t, 11, 300, 100)
	if err := s.Expect(c.d, 300, c.chunks); err != nil {
		t.Fatal(err)
	}
	if err := c.write(t, s, 1); err != nil {
		t.Fatal(err)
	}
	// Tamper with a chunk that never arrived: after a restart it must not
	// count as arrived.
	pf := filepath.Join(root, "partial", c.d.Encoded())
	f, err := os.OpenFile(pf, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(c.data[200:], 200) // right bytes, but must be re-verified anyway
	f.WriteAt([]byte("garbage"), 0)
	f.Close()

	s2, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	if err := s2.Expect(c.d, 300, c.chunks); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 100)
	if _, err := s2.ReadAt(context.Background(), c.d, got, 100); err != nil || !bytes.Equal(got, c.data[100:200]) {
		t.Fatalf("verified chunk lost across restart: %v", err)
	}
	if _, err := s2.ReadAt(context.Background(), c.d, got, 200); err != nil || !bytes.Equal(got, c.data[200:]) {
		t.Fatalf("matching chunk not recovered across restart: %v", err)
	}
	if !blocked(t, s2, c.d, 0, 10) {
		t.Fatal("tampered chunk is readable after restart")
	}
	if err := c.write(t, s2, 0); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, s2, c.d, 300); !bytes.Equal(got, c.data) {
		t.Fatal("content differs")
	}
}

func TestRemove(t *testing.T) {
	s := openStore(t)
	c := newContent(t, 12, 100, 100)
	if err := s.Expect(c.d, 100, nil); err != nil {
		t.Fatal(err)
	}
	if err := c.write(t, s, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(c.d); err != nil {
		t.Fatal(err)
	}
	if s.Has(c.d) {
		t.Fatal("removed content still there")
	}
	if _, err := s.ReadAt(context.Background(), c.d, make([]byte, 1), 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("read of removed content: %v, want ErrNotFound", err)
	}
}

// bundleOf encodes a bundle carrying the given contents, from frame resume on.
func bundleOf(t testing.TB, resume int, cs ...*testContent) []byte {
	t.Helper()
	h := &api.BundleHeader{
		ManifestDigest: digest.FromString("manifest").String(),
		Resume:         resume,
	}
	layer := api.LayerTree{Digest: digest.FromString("layer").String()}
	var raws [][]byte
	for i, c := range cs {
		layer.Entries = append(layer.Entries, c.entry(string(rune('a'+i))))
		h.Frames = append(h.Frames, c.frames...)
		raws = append(raws, c.raw...)
	}
	h.Layers = []api.LayerTree{layer}
	var buf bytes.Buffer
	w, err := bundle.NewWriter(&buf, h)
	if err != nil {
		t.Fatal(err)
	}
	for _, raw := range raws[resume:] {
		if err := w.WriteFrame(bytes.NewReader(raw)); err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}

func TestReceive(t *testing.T) {
	s := openStore(t)
	a := newContent(t, 13, 50_000, 16_384)
	b := newContent(t, 14, 1000, 1000)
	br, err := bundle.NewReader(bytes.NewReader(bundleOf(t, 0, a, b)))
	if err != nil {
		t.Fatal(err)
	}
	var last Progress
	if err := s.Receive(context.Background(), br, func(p Progress) { last = p }); err != nil {
		t.Fatal(err)
	}
	if last.Frames != 5 || last.FramesTotal != 5 || last.Bytes != last.BytesTotal || last.Contents != 2 || last.ContentsTotal != 2 {
		t.Fatalf("final progress %+v", last)
	}
	for _, c := range []*testContent{a, b} {
		if got := readAll(t, s, c.d, len(c.data)); !bytes.Equal(got, c.data) {
			t.Fatal("content differs")
		}
	}
}

func TestReceiveTruncatedThenResumed(t *testing.T) {
	s := openStore(t)
	a := newContent(t, 15, 5000, 5000)
	b := newContent(t, 16, 30_000, 10_000)
	stream := bundleOf(t, 0, a, b)
	// Cut the stream in the middle of b's second frame.
	cut := len(stream) - len(b.raw[2]) - len(b.raw[1])/2
	br, err := bundle.NewReader(bytes.NewReader(stream[:cut]))
	if err != nil {
		t.Fatal(err)
	}
	var last Progress
	err = s.Receive(context.Background(), br, func(p Progress) { last = p })
	if !errors.Is(err, bundle.ErrCorrupt) {
		t.Fatalf("Receive of a truncated stream: %v, want ErrCorrupt", err)
	}
	if !s.Has(a.d) {
		t.Fatal("content before the cut did not complete")
	}
	if s.Has(b.d) || len(contentFiles(t, s)) != 1 {
		t.Fatal("truncated content is in content/")
	}
	// What arrived of b is readable; the rest is pending, not failed.
	got := make([]byte, 10_000)
	if _, err := s.ReadAt(context.Background(), b.d, got, 0); err != nil || !bytes.Equal(got, b.data[:10_000]) {
		t.Fatalf("arrived chunk of b: %v", err)
	}
	if !blocked(t, s, b.d, 10_000, 10) {
		t.Fatal("chunk cut in the middle is readable or failed")
	}
	if last.Frames != 2 {
		t.Fatalf("progress says %d frames, want 2", last.Frames)
	}

	// Resume where the progress says.
	br, err = bundle.NewReader(bytes.NewReader(bundleOf(t, last.Frames, a, b)))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Receive(context.Background(), br, func(p Progress) { last = p }); err != nil {
		t.Fatal(err)
	}
	if last.Frames != 4 || last.Bytes != last.BytesTotal || last.Contents != 1 {
		t.Fatalf("final progress %+v", last)
	}
	if got := readAll(t, s, b.d, len(b.data)); !bytes.Equal(got, b.data) {
		t.Fatal("resumed content differs")
	}
}

func TestReceiveCorruptFrame(t *testing.T) {
	s := openStore(t)
	a := newContent(t, 17, 1000, 1000)
	a.raw[0] = gz(t, bytes.Repeat([]byte{'x'}, 1000)) // wrong bytes
	a.frames[0].CompressedSize = int64(len(a.raw[0]))
	br, err := bundle.NewReader(bytes.NewReader(bundleOf(t, 0, a)))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Receive(context.Background(), br, nil); !errors.Is(err, bundle.ErrCorrupt) {
		t.Fatalf("got %v, want ErrCorrupt", err)
	}
	if s.Has(a.d) || len(contentFiles(t, s)) != 0 || !blocked(t, s, a.d, 0, 1) {
		t.Fatal("corrupt content is readable")
	}
}

// blockingReader yields prefix, then blocks until ctx is done.
type blockingReader struct {
	prefix *bytes.Reader
	ctx    context.Context
}

func (r *blockingReader) Read(p []byte) (int, error) {
	if r.prefix.Len() > 0 {
		return r.prefix.Read(p)
	}
	<-r.ctx.Done()
	return 0, r.ctx.Err()
}

func TestReceiveCancel(t *testing.T) {
	s := openStore(t)
	a := newContent(t, 18, 1000, 1000)
	b := newContent(t, 19, 1000, 1000)
	stream := bundleOf(t, 0, a, b)
	ctx, cancel := context.WithCancel(context.Background())
	br, err := bundle.NewReader(&blockingReader{bytes.NewReader(stream[:len(stream)-len(b.raw[0])]), ctx})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		done <- s.Receive(ctx, br, func(p Progress) {
			if p.Contents == 1 {
				cancel()
			}
		})
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Receive ignored cancellation")
	}
	if !s.Has(a.d) || s.Has(b.d) || !blocked(t, s, b.d, 0, 1) {
		t.Fatal("wrong state after cancellation")
	}
}

func TestConcurrentWriters(t *testing.T) {
	s := openStore(t)
	c := newContent(t, 20, 1<<20, 64<<10)
	if err := s.Expect(c.d, int64(len(c.data)), c.chunks); err != nil {
		t.Fatal(err)
	}
	// Two bundles deliver the same content at once, in opposite orders,
	// while readers read it.
	errs := make(chan error, 4)
	for _, reverse := range []bool{false, true} {
		go func() {
			for k := range c.frames {
				i := k
				if reverse {
					i = len(c.frames) - 1 - k
				}
				data, _ := bundle.Decode(c.frames[i], bytes.NewReader(c.raw[i]))
				if err := s.WriteChunk(c.frames[i], data); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for r := range 2 {
		go func() {
			p := make([]byte, 100_000)
			for off := r * 1000; off < len(c.data); off += len(p) {
				n, err := s.ReadAt(context.Background(), c.d, p, int64(off))
				if err != nil && err != io.EOF {
					errs <- err
					return
				}
				if !bytes.Equal(p[:n], c.data[off:off+n]) {
					errs <- errors.New("read wrong bytes")
					return
				}
			}
			errs <- nil
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if !s.Has(c.d) {
		t.Fatal("content not complete")
	}
}

func TestReceiveLayoutFromFrames(t *testing.T) {
	s := openStore(t)
	// The same content, stored by two layers with different chunk sizes;
	// the bundle carries the second layout.
	big := newContent(t, 21, 3000, 3000)
	small := newContent(t, 21, 3000, 1000)
	h := &api.BundleHeader{
		ManifestDigest: digest.FromString("manifest").String(),
		Layers: []api.LayerTree{
			{Digest: digest.FromString("l1").String(), Entries: []api.Entry{big.entry("f")}},
			{Digest: digest.FromString("l2").String(), Entries: []api.Entry{small.entry("g")}},
		},
		Frames: small.frames,
	}
	var buf bytes.Buffer
	w, err := bundle.NewWriter(&buf, h)
	if err != nil {
		t.Fatal(err)
	}
	for _, raw := range small.raw {
		w.WriteFrame(bytes.NewReader(raw))
	}
	br, err := bundle.NewReader(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Receive(context.Background(), br, nil); err != nil {
		t.Fatal(err)
	}
	if !s.Has(small.d) {
		t.Fatal("content not complete")
	}

	// Frames of a content no entry lists are refused.
	h.Layers = h.Layers[:0]
	if err := s.ExpectHeader(h); !errors.Is(err, ErrMismatch) {
		t.Fatalf("got %v, want ErrMismatch", err)
	}
}

// Contents are not fsynced one by one; a store that was not closed cleanly
// before the machine went down re-verifies every content at the next Open
// and drops torn ones, while a cleanly closed store, or one whose process
// died without the machine, trusts what it has.
func TestUncleanShutdownReverifies(t *testing.T) {
	root := t.TempDir()
	s, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	good, torn := newContent(t, 1, 5000, 4096), newContent(t, 2, 3000, 4096)
	for _, c := range []*testContent{good, torn} {
		if err := s.Expect(c.d, int64(len(c.data)), c.chunks); err != nil {
			t.Fatal(err)
		}
		for i := range c.frames {
			if err := c.write(t, s, i); err != nil {
				t.Fatal(err)
			}
		}
	}
	if !s.Has(good.d) || !s.Has(torn.d) {
		t.Fatal("contents not complete")
	}
	// A crash before the data reached the disk: the file is there, its
	// bytes are not.
	tornPath := s.path(torn.d)
	if err := os.Chmod(tornPath, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tornPath, make([]byte, len(torn.data)), 0o444); err != nil {
		t.Fatal(err)
	}

	// Only the worker process died, in this boot: what it wrote is in the
	// page cache, so nothing is re-hashed (the torn file stands for data
	// that would still reach the disk).
	s1, err := Open(root) // no Close: unclean
	if err != nil {
		t.Fatal(err)
	}
	if !s1.Has(torn.d) {
		t.Error("a process crash made the store re-verify its contents")
	}
	// The machine went down: the marker holds another boot's ID.
	if err := os.WriteFile(filepath.Join(root, uncleanMarker), []byte("an-earlier-boot"), 0o600); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(root) // no Close: unclean
	if err != nil {
		t.Fatal(err)
	}
	if !s2.Has(good.d) {
		t.Error("a verified content was dropped")
	}
	if s2.Has(torn.d) {
		t.Error("a torn content survived an unclean shutdown")
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, uncleanMarker)); !os.IsNotExist(err) {
		t.Errorf("clean close left the marker: %v", err)
	}
	s3, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	if !s3.Has(good.d) {
		t.Error("content lost across a clean restart")
	}
}

// HasChunk tells a resumed pull where the stream must start: the chunks
// that arrived (in any order) and every chunk of a complete content are in.
func TestHasChunk(t *testing.T) {
	s := openStore(t)
	c := newContent(t, 9, 10_000, 4096) // chunks at 0, 4096, 8192
	if s.HasChunk(c.d, 0) {
		t.Error("a chunk of an unknown content is in")
	}
	if err := s.Expect(c.d, int64(len(c.data)), c.chunks); err != nil {
		t.Fatal(err)
	}
	if err := c.write(t, s, 1); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		off  int64
		want bool
	}{{0, false}, {4096, true}, {8192, false}, {100, false}} {
		if got := s.HasChunk(c.d, tc.off); got != tc.want {
			t.Errorf("pending content, chunk at %d: in = %v, want %v", tc.off, got, tc.want)
		}
	}
	for _, i := range []int{0, 2} {
		if err := c.write(t, s, i); err != nil {
			t.Fatal(err)
		}
	}
	for _, off := range []int64{0, 4096, 8192} {
		if !s.HasChunk(c.d, off) {
			t.Errorf("complete content, chunk at %d: not in", off)
		}
	}
}

// TestDataPath: a complete content has a short second name in DataDir
// (for overlayfs redirects), the full path when the short one is taken,
// and Remove removes both.
func TestDataPath(t *testing.T) {
	s := openStore(t)
	put := func(seed int64) *testContent {
		c := newContent(t, seed, 100, 64)
		if err := s.Expect(c.d, int64(len(c.data)), c.chunks); err != nil {
			t.Fatal(err)
		}
		for i := range c.frames {
			if err := c.write(t, s, i); err != nil {
				t.Fatal(err)
			}
		}
		return c
	}
	a, b := put(1), put(2)
	if _, err := s.DataPath(digest.FromString("absent")); !errors.Is(err, ErrNotFound) {
		t.Errorf("DataPath of an absent content: %v", err)
	}
	rel, err := s.DataPath(a.d)
	if err != nil {
		t.Fatal(err)
	}
	if len(rel) != 24 || rel[0] != '/' {
		t.Errorf("DataPath %q: want 24 bytes from /", rel)
	}
	if got, err := os.ReadFile(filepath.Join(s.DataDir(), rel)); err != nil || !bytes.Equal(got, a.data) {
		t.Errorf("%s: %v", rel, err)
	}
	// The short name of b, taken by something else: the full path.
	short := filepath.Join(s.DataDir(), s.shortName(b.d))
	os.MkdirAll(filepath.Dir(short), 0o700)
	if err := os.WriteFile(short, []byte("other"), 0o400); err != nil {
		t.Fatal(err)
	}
	if rel, err := s.DataPath(b.d); err != nil || rel != "/sha256/"+b.d.Encoded()[:2]+"/"+b.d.Encoded() {
		t.Errorf("DataPath with the short name taken: %q, %v", rel, err)
	}
	if err := s.Remove(a.d); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(s.DataDir(), s.shortName(a.d))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("short name after Remove: %v", err)
	}
	if err := s.Remove(b.d); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(short); err != nil {
		t.Errorf("Remove removed a short name that was not the content's: %v", err)
	}
}
