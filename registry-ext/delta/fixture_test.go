package delta

import (
	"archive/tar"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/convert"
	"github.com/starlight-project/starlight/schema"
)

// The index the Planner and Traced read is package schema's database.
var (
	_ Index      = (*schema.DB)(nil)
	_ TraceIndex = (*schema.DB)(nil)
)

// testChunkSize is small so that modest test files span several chunks.
const testChunkSize = 4096

// fixture is an index database (SQLite, through package schema) plus a
// blob store, filled the way the registry fills them on conversion,
// without the registry.
type fixture struct {
	t  testing.TB
	db *schema.DB
	// raw is a second connection to the same database, for the rows no
	// method of schema writes the way a test needs (merged priorities
	// with chosen push times).
	raw   *sql.DB
	blobs *testBlobs
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	path := filepath.Join(t.TempDir(), "index.db")
	db, err := schema.Open(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	raw, err := sql.Open("sqlite3", path+"?_busy_timeout=5000")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	return &fixture{t: t, db: db, raw: raw, blobs: &testBlobs{dir: t.TempDir(), opens: map[digest.Digest]int{}}}
}

func (f *fixture) planner() *Planner { return New(f.db, f.blobs) }

// tfile describes one tar entry of a test layer.
type tfile struct {
	name    string
	typ     byte // tar.TypeReg when 0
	content []byte
	link    string
	mode    int64
	xattrs  map[string]string
	// hdr, when set, edits the tar header last: modes and mtimes the
	// defaults above leave out.
	hdr func(*tar.Header)
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
	entries []api.Entry // as convert.ReadIndex reads the TOC
}

// layer builds an eStargz blob from files, stores it and indexes it as
// the registry does: convert.ReadIndex, then schema's PutLayer.
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
		if tf.hdr != nil {
			tf.hdr(h)
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
	idx, err := convert.ReadIndex(bytes.NewReader(blob), int64(len(blob)))
	if err != nil {
		t.Fatal(err)
	}
	l := &tlayer{digest: f.blobs.put(t, blob), diffID: b.DiffID(), size: int64(len(blob)), entries: idx.Entries}
	f.index(l, b.TOCDigest())
	return l
}

// index stores the index of a layer.
func (f *fixture) index(l *tlayer, toc digest.Digest) {
	f.t.Helper()
	if err := f.db.PutLayer(context.Background(), &schema.Layer{Digest: l.digest.String(), DiffID: l.diffID.String(),
		Size: l.size, TOCDigest: toc.String(), Entries: l.entries}); err != nil {
		f.t.Fatal(err)
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
	im := schema.ImageManifest{Platform: "linux/amd64", OriginalDigest: md.String(), ManifestDigest: md.String(),
		ConfigDigest: m.Config.Digest.String()}
	for _, l := range layers {
		im.Layers = append(im.Layers, l.digest.String())
	}
	f.complete(repository, md, md, im)
	return md
}

// complete records the conversion of the image pushed as pushed in
// repository to converted, as a conversion job does.
func (f *fixture) complete(repository string, pushed, converted digest.Digest, manifests ...schema.ImageManifest) {
	t := f.t
	t.Helper()
	ctx := context.Background()
	if err := f.db.UpsertImage(ctx, schema.Image{Repository: repository, Digest: pushed.String(),
		MediaType: ocispec.MediaTypeImageManifest, State: api.StateConverting}); err != nil {
		t.Fatal(err)
	}
	if err := f.db.CompleteImage(ctx, repository, pushed.String(), converted.String(),
		ocispec.MediaTypeImageManifest, manifests); err != nil {
		t.Fatal(err)
	}
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
