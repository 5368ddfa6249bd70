package delta

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	_ "github.com/mattn/go-sqlite3"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/pressly/goose/v3"

	"github.com/starlight-project/starlight/api"
)

// testChunkSize is small so that modest test files span several chunks.
const testChunkSize = 4096

// fixture is an index database plus a blob store, filled the way the
// registry fills them on conversion, without the registry.
type fixture struct {
	t     testing.TB
	db    *sql.DB
	blobs *testBlobs
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	db, err := sql.Open("sqlite3", filepath.Join(t.TempDir(), "index.db")+"?_journal_mode=WAL&_busy_timeout=5000")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	goose.SetLogger(goose.NopLogger())
	if err := goose.SetDialect("sqlite3"); err != nil {
		t.Fatal(err)
	}
	if err := goose.Up(db, "../../schema/migrations"); err != nil {
		t.Fatalf("applying migrations: %v", err)
	}
	return &fixture{t: t, db: db, blobs: &testBlobs{dir: t.TempDir(), opens: map[digest.Digest]int{}}}
}

func (f *fixture) planner() *Planner { return New(f.db, nil, f.blobs) }

// tfile describes one tar entry of a test layer.
type tfile struct {
	name    string
	typ     byte // tar.TypeReg when 0
	content []byte
	link    string
	mode    int64
	xattrs  map[string]string
}

func reg(name string, content []byte) tfile { return tfile{name: name, content: content} }
func dir(name string) tfile                 { return tfile{name: name, typ: tar.TypeDir} }

// data returns n deterministic, incompressible bytes.
func data(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x5eed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// tlayer is a converted layer stored in the fixture.
type tlayer struct {
	digest  digest.Digest
	diffID  digest.Digest
	size    int64
	entries []api.Entry // as rebuilt from the TOC
}

// layer builds an eStargz blob from files, stores it and indexes it.
func (f *fixture) layer(files ...tfile) *tlayer {
	t := f.t
	t.Helper()
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	for _, tf := range files {
		h := &tar.Header{Name: tf.name, Typeflag: tf.typ, Mode: tf.mode, Linkname: tf.link,
			ModTime: time.Unix(1700000000, 0), Uid: 1000, Gid: 1000, Format: tar.FormatPAX}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(tf.content))
		}
		if len(tf.xattrs) > 0 {
			h.PAXRecords = map[string]string{}
			for k, v := range tf.xattrs {
				h.PAXRecords["SCHILY.xattr."+k] = v
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(tf.content); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tb.Bytes()), 0, int64(tb.Len())),
		estargz.WithChunkSize(testChunkSize))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	blob, err := io.ReadAll(b)
	if err != nil {
		t.Fatal(err)
	}
	l := &tlayer{digest: f.blobs.put(t, blob), diffID: b.DiffID(), size: int64(len(blob))}
	l.entries = tocEntries(t, blob)
	f.index(l, b.TOCDigest())
	return l
}

// tocEntries reads an eStargz TOC into entries with chunk locations: a
// chunk's gzip member ends where the next member (or the TOC) starts.
func tocEntries(t testing.TB, blob []byte) []api.Entry {
	t.Helper()
	tocOff, _, err := estargz.OpenFooter(io.NewSectionReader(bytes.NewReader(blob), 0, int64(len(blob))))
	if err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(blob[tocOff:]))
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	if h, err := tr.Next(); err != nil || h.Name != estargz.TOCTarName {
		t.Fatalf("no TOC: %v", err)
	}
	var toc estargz.JTOC
	if err := json.NewDecoder(tr).Decode(&toc); err != nil {
		t.Fatal(err)
	}
	end := func(i int) int64 {
		for _, n := range toc.Entries[i+1:] {
			if n.Offset > toc.Entries[i].Offset {
				return n.Offset
			}
		}
		return tocOff
	}
	var entries []api.Entry
	for i, te := range toc.Entries {
		if te.Type != "chunk" {
			name := strings.TrimPrefix(path.Clean("/"+te.Name), "/")
			if name == "" {
				continue
			}
			var mtime time.Time
			if te.ModTime3339 != "" {
				if mtime, err = time.Parse(time.RFC3339, te.ModTime3339); err != nil {
					t.Fatal(err)
				}
			}
			entries = append(entries, api.Entry{
				Name: name, Type: te.Type, Mode: uint32(te.Mode & 0o7777), UID: te.UID, GID: te.GID,
				Size: te.Size, ModTime: time.Unix(0, mtime.UnixNano()).UTC(), LinkName: te.LinkName,
				DevMajor: int64(te.DevMajor), DevMinor: int64(te.DevMinor), Xattrs: te.Xattrs, Digest: te.Digest,
			})
			if te.Type != api.TypeReg || te.Size == 0 {
				// eStargz records the digest of an empty file; the
				// index does not (nothing travels for it).
				entries[len(entries)-1].Digest = ""
				continue
			}
		}
		e := &entries[len(entries)-1]
		size := te.ChunkSize
		if size == 0 {
			size = e.Size - te.ChunkOffset
		}
		e.Chunks = append(e.Chunks, api.Chunk{Offset: te.ChunkOffset, Size: size, Digest: te.ChunkDigest,
			CompressedOffset: te.Offset, CompressedSize: end(i) - te.Offset})
	}
	return entries
}

// index inserts the rows the registry writes for a converted layer.
func (f *fixture) index(l *tlayer, toc digest.Digest) {
	t := f.t
	t.Helper()
	exec := func(q string, args ...any) {
		t.Helper()
		if _, err := f.db.Exec(q, args...); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	exec(`INSERT INTO layers (digest, diff_id, size, toc_digest, uncompressed_size, files, created_at)
		VALUES (?, ?, ?, ?, 0, ?, 0)`, l.digest.String(), l.diffID.String(), l.size, toc.String(), len(l.entries))
	for pos, e := range l.entries {
		xattrs := ""
		if len(e.Xattrs) > 0 {
			b, _ := json.Marshal(e.Xattrs)
			xattrs = string(b)
		}
		exec(`INSERT INTO files (layer_digest, position, name, type, mode, uid, gid, size, mtime, link_name,
			dev_major, dev_minor, xattrs, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			l.digest.String(), pos, e.Name, e.Type, e.Mode, e.UID, e.GID, e.Size, e.ModTime.UnixNano(),
			e.LinkName, e.DevMajor, e.DevMinor, xattrs, e.Digest)
		for _, c := range e.Chunks {
			exec(`INSERT INTO chunks (layer_digest, file_position, chunk_offset, chunk_size, chunk_digest,
				compressed_offset, compressed_size) VALUES (?, ?, ?, ?, ?, ?, ?)`,
				l.digest.String(), pos, c.Offset, c.Size, c.Digest, c.CompressedOffset, c.CompressedSize)
		}
	}
}

// image stores a config and an OCI manifest over layers and indexes them
// as a converted platform manifest of repository.
func (f *fixture) image(repository string, layers ...*tlayer) digest.Digest {
	t := f.t
	t.Helper()
	config := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{}}}
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, Layers: []ocispec.Descriptor{}}
	m.SchemaVersion = 2
	for _, l := range layers {
		config.RootFS.DiffIDs = append(config.RootFS.DiffIDs, l.diffID)
		m.Layers = append(m.Layers, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: l.digest, Size: l.size})
	}
	cb, _ := json.Marshal(config)
	m.Config = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: f.blobs.put(t, cb), Size: int64(len(cb))}
	mb, _ := json.Marshal(m)
	md := f.blobs.put(t, mb)
	for i, l := range layers {
		if _, err := f.db.Exec(`INSERT INTO manifest_layers (manifest_digest, position, layer_digest) VALUES (?, ?, ?)`,
			md.String(), i, l.digest.String()); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.db.Exec(`INSERT INTO image_manifests (repository, image_digest, platform, original_digest,
		manifest_digest, config_digest) VALUES (?, ?, 'linux/amd64', ?, ?, ?)`,
		repository, md.String(), md.String(), md.String(), m.Config.Digest.String()); err != nil {
		t.Fatal(err)
	}
	return md
}

// testBlobs is a content-addressed blob directory behind BlobOpener. It
// counts opens and tracks open handles, and can gate reads.
type testBlobs struct {
	dir string

	mu    sync.Mutex
	opens map[digest.Digest]int
	open  int
	// gate, when set, blocks every read of the gated blobs opened
	// afterwards until it is closed or the request is cancelled.
	gate  chan struct{}
	gated map[digest.Digest]bool
}

func (b *testBlobs) put(t testing.TB, blob []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(blob)
	if err := os.WriteFile(filepath.Join(b.dir, d.Encoded()), blob, 0o644); err != nil {
		t.Fatal(err)
	}
	return d
}

func (b *testBlobs) OpenBlob(ctx context.Context, repository string, dgst digest.Digest) (io.ReadSeekCloser, error) {
	if err := dgst.Validate(); err != nil {
		return nil, err
	}
	f, err := os.Open(filepath.Join(b.dir, dgst.Encoded()))
	if err != nil {
		return nil, fmt.Errorf("blob %s: %w", dgst, err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.opens[dgst]++
	b.open++
	h := &testHandle{File: f, b: b, ctx: ctx}
	if b.gated[dgst] {
		h.gate = b.gate
	}
	return h, nil
}

func (b *testBlobs) count(d digest.Digest) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.opens[d]
}

func (b *testBlobs) stillOpen() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.open
}

type testHandle struct {
	*os.File
	b    *testBlobs
	ctx  context.Context
	gate chan struct{}
}

func (h *testHandle) Read(p []byte) (int, error) {
	if h.gate != nil {
		select {
		case <-h.gate:
		case <-h.ctx.Done():
			return 0, h.ctx.Err()
		}
	}
	return h.File.Read(p)
}

func (h *testHandle) Close() error {
	h.b.mu.Lock()
	h.b.open--
	h.b.mu.Unlock()
	return h.File.Close()
}
