package convert

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
)

// estargzBlob builds an eStargz blob of a tar with estargz's own builder
// (its compressor, its landmark), as another eStargz tool would push it.
func estargzBlob(t testing.TB, tarb []byte) ([]byte, digest.Digest) {
	t.Helper()
	b, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tarb), 0, int64(len(tarb))), estargz.WithChunkSize(testChunkSize))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	blob, err := io.ReadAll(b)
	if err != nil {
		t.Fatal(err)
	}
	return blob, b.TOCDigest()
}

// rewriteTOC replaces the TOC of an eStargz blob by mutate's version of it,
// leaving every member before it as it is.
func rewriteTOC(t testing.TB, blob []byte, mutate func(*estargz.JTOC)) ([]byte, digest.Digest) {
	t.Helper()
	p := &estargz.GzipDecompressor{}
	fs := int(p.FooterSize())
	_, off, _, err := p.ParseFooter(blob[len(blob)-fs:])
	if err != nil {
		t.Fatal(err)
	}
	rc, err := p.DecompressTOC(bytes.NewReader(blob[off : len(blob)-fs]))
	if err != nil {
		t.Fatal(err)
	}
	var toc estargz.JTOC
	if err := json.NewDecoder(rc).Decode(&toc); err != nil {
		t.Fatal(err)
	}
	mutate(&toc)
	var out bytes.Buffer
	out.Write(blob[:off])
	d, err := estargz.NewGzipCompressor().WriteTOCAndFooter(&out, off, &toc, nil)
	if err != nil {
		t.Fatal(err)
	}
	return out.Bytes(), d
}

// tocEntryNamed returns the TOC's first entry of name (not a chunk).
func tocEntryNamed(t testing.TB, toc *estargz.JTOC, name string) *estargz.TOCEntry {
	t.Helper()
	for _, e := range toc.Entries {
		if e.Type != "chunk" && strings.TrimPrefix(e.Name, "./") == name {
			return e
		}
	}
	t.Fatalf("no TOC entry %q", name)
	return nil
}

// uncompressed returns the digest of a blob's decompressed stream.
func uncompressed(t testing.TB, blob []byte) digest.Digest {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(blob))
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.Copy(h, zr); err != nil {
		t.Fatal(err)
	}
	return digest.NewDigest(digest.SHA256, h)
}

// addEStargzImage stores an OCI image of one layer annotated as eStargz
// with the TOC digest toc; diffID is its config's diff_id.
func addEStargzImage(t *testing.T, s *memStore, blob []byte, toc, diffID digest.Digest) ocispec.Descriptor {
	t.Helper()
	layer := s.add(t, ocispec.MediaTypeImageLayerGzip, blob)
	layer.Annotations = map[string]string{AnnotationTOCDigest: toc.String(), AnnotationUncompressedSize: "1"}
	cfg := s.add(t, ocispec.MediaTypeImageConfig, ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{diffID}},
	})
	return s.add(t, ocispec.MediaTypeImageManifest, ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
		Config: cfg, Layers: []ocispec.Descriptor{layer},
	})
}

// dockerView is what unpacking a layer's tar gives (docker pull): every
// name but eStargz's metadata, with its type, mode, owner, number of
// xattrs and, for a regular file, the digest of its content; a later entry
// of a name replaces the earlier one.
func dockerView(t testing.TB, blob []byte) map[string]string {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(blob))
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	view := map[string]string{}
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return view
		}
		if err != nil {
			t.Fatal(err)
		}
		name, err := cleanTarName(h.Name)
		if err != nil {
			t.Fatal(err)
		}
		if name == "" || IsMetadataEntry(name) {
			continue
		}
		v := fmt.Sprintf("%s %#o %d:%d xattrs:%d", apiType(h.Typeflag), h.Mode&0o7777, h.Uid, h.Gid, len(tarXattrs(h)))
		if h.Typeflag == tar.TypeReg && h.Size > 0 {
			b, _ := io.ReadAll(tr)
			v += " " + sha256Hex(b)
		}
		view[name] = v
	}
}

// workerView is what the worker shows of a layer: its index, with every
// chunk decoded from the member the index locates it in, as a bundle
// frame is. A chunk that does not decode shows as its error.
func workerView(t testing.TB, blob []byte, idx *Index) map[string]string {
	t.Helper()
	view := map[string]string{}
	for _, e := range idx.Entries {
		v := fmt.Sprintf("%s %#o %d:%d xattrs:%d", e.Type, e.Mode, e.UID, e.GID, len(e.Xattrs))
		if e.Type == api.TypeReg && e.Size > 0 {
			h := sha256.New()
			for _, c := range e.Chunks {
				f := api.Frame{Digest: e.Digest, Offset: c.Offset, Size: c.Size, ChunkDigest: c.Digest, CompressedSize: c.CompressedSize}
				r, err := bundle.Decode(f, bytes.NewReader(blob[c.CompressedOffset:c.CompressedOffset+c.CompressedSize]))
				if err == nil {
					_, err = io.Copy(h, r)
				}
				if err != nil {
					h.Write([]byte(err.Error()))
				}
			}
			v += " sha256:" + hex.EncodeToString(h.Sum(nil))
		}
		view[e.Name] = v
	}
	return view
}

// TestReuseVerifiesEStargz pushes eStargz layers whose TOC lies about the
// tar in the ways a hostile pusher could make the Starlight worker show
// other files than docker pull: each is converted from its tar instead of
// kept, and the worker's view of the result is docker pull's. Honest
// eStargz, from Starlight or from estargz's own builder, is kept as is.
func TestReuseVerifiesEStargz(t *testing.T) {
	same := func(s string) []byte { return []byte(strings.Repeat(s, 100)) }
	files := []tarEntry{
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "app/", Mode: 0o755, ModTime: baseTime}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "app/decoy", Mode: 0o644, Size: 700, ModTime: baseTime}, data: same("evilbin")},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "app/x", Mode: 0o755, Size: 700, ModTime: baseTime}, data: same("goodbin")},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "app/pad1", Mode: 0o644, Size: 700, ModTime: baseTime}, data: same("padding")},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "app/pad2", Mode: 0o644, Size: 700, ModTime: baseTime}, data: same("morepad")},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "app/big", Mode: 0o644, Size: 3*testChunkSize + 10, ModTime: baseTime}, data: pseudoRandom(5, 3*testChunkSize+10)},
	}
	opts, tmps := testOptions(t)
	own, err := ConvertLayer(context.Background(), bytes.NewReader(buildTar(t, files)), opts)
	if err != nil {
		t.Fatal(err)
	}
	ownBlob, _ := io.ReadAll(own.File)
	ownTOC := own.Index.TOCDigest
	own.Close()
	sha := func(b []byte) string { return sha256Hex(b) }

	for _, tc := range []struct {
		name   string
		blob   func() ([]byte, digest.Digest)
		reused bool
	}{
		{"starlight's own", func() ([]byte, digest.Digest) { return ownBlob, ownTOC }, true},
		{"estargz builder", func() ([]byte, digest.Digest) { return estargzBlob(t, buildTar(t, trickyEntries())) }, true},
		{"estargz builder, files", func() ([]byte, digest.Digest) { return estargzBlob(t, buildTar(t, files)) }, true},
		// The TOC drops the decoy and points app/x at its member, with its
		// digest: the worker would run evilbin as app/x.
		{"file pointed at another's member", func() ([]byte, digest.Digest) {
			return rewriteTOC(t, ownBlob, func(toc *estargz.JTOC) {
				decoy, x := tocEntryNamed(t, toc, "app/decoy"), tocEntryNamed(t, toc, "app/x")
				x.Offset, x.Digest, x.ChunkDigest = decoy.Offset, decoy.Digest, decoy.ChunkDigest
				var kept []*estargz.TOCEntry
				for _, e := range toc.Entries {
					if e != decoy {
						kept = append(kept, e)
					}
				}
				toc.Entries = kept
			})
		}, false},
		// Names and digests right, members shifted: app/x's offset is
		// pad1's member, pad1's is pad2's.
		{"members shifted", func() ([]byte, digest.Digest) {
			return rewriteTOC(t, ownBlob, func(toc *estargz.JTOC) {
				x, p1, p2 := tocEntryNamed(t, toc, "app/x"), tocEntryNamed(t, toc, "app/pad1"), tocEntryNamed(t, toc, "app/pad2")
				x.Offset, p1.Offset, p2.Offset = p1.Offset, p2.Offset, p2.Offset+1
			})
		}, false},
		{"content digest", func() ([]byte, digest.Digest) {
			return rewriteTOC(t, ownBlob, func(toc *estargz.JTOC) {
				x := tocEntryNamed(t, toc, "app/x")
				x.Digest, x.ChunkDigest = sha(same("evilbin")), sha(same("evilbin"))
			})
		}, false},
		{"chunk digest", func() ([]byte, digest.Digest) {
			return rewriteTOC(t, ownBlob, func(toc *estargz.JTOC) {
				for _, e := range toc.Entries {
					if e.Type == "chunk" && e.ChunkOffset == testChunkSize {
						e.ChunkDigest = sha([]byte("other"))
					}
				}
			})
		}, false},
		{"mode", func() ([]byte, digest.Digest) {
			return rewriteTOC(t, ownBlob, func(toc *estargz.JTOC) { tocEntryNamed(t, toc, "app/pad1").Mode = 0o4755 })
		}, false},
		{"owner", func() ([]byte, digest.Digest) {
			return rewriteTOC(t, ownBlob, func(toc *estargz.JTOC) { tocEntryNamed(t, toc, "app/pad1").UID = 1000 })
		}, false},
		{"xattr", func() ([]byte, digest.Digest) {
			return rewriteTOC(t, ownBlob, func(toc *estargz.JTOC) {
				tocEntryNamed(t, toc, "app/x").Xattrs = map[string][]byte{"security.capability": {1}}
			})
		}, false},
		{"extra file", func() ([]byte, digest.Digest) {
			return rewriteTOC(t, ownBlob, func(toc *estargz.JTOC) {
				toc.Entries = append(toc.Entries, &estargz.TOCEntry{Name: "app/ghost", Type: "dir", Mode: 0o755})
			})
		}, false},
		{"missing file", func() ([]byte, digest.Digest) {
			return rewriteTOC(t, ownBlob, func(toc *estargz.JTOC) {
				var kept []*estargz.TOCEntry
				for _, e := range toc.Entries {
					if strings.TrimPrefix(e.Name, "./") != "app/pad2" {
						kept = append(kept, e)
					}
				}
				toc.Entries = kept
			})
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blob, toc := tc.blob()
			s := newMemStore()
			src := addEStargzImage(t, s, blob, toc, uncompressed(t, blob))
			res, err := ConvertImage(context.Background(), s, src, opts)
			if err != nil {
				t.Fatal(err)
			}
			l := res.Manifests[0].Layers[0]
			if l.Reused != tc.reused {
				t.Errorf("reused = %v, want %v", l.Reused, tc.reused)
			}
			if tc.reused && (res.Desc.Digest != src.Digest || l.Desc.Annotations[AnnotationUncompressedSize] == "1") {
				t.Errorf("kept layer: root %s (pushed %s), uncompressed size annotation %q", res.Desc.Digest, src.Digest, l.Desc.Annotations[AnnotationUncompressedSize])
			}
			out := s.blobs[l.Desc.Digest]
			if got, want := workerView(t, out, l.Index), dockerView(t, blob); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("the worker would see\n%v\ndocker pull sees\n%v", got, want)
			}
			if l.Index.UncompressedSize <= 0 {
				t.Errorf("uncompressed size %d", l.Index.UncompressedSize)
			}
		})
	}
	for _, d := range tmps {
		assertEmptyDir(t, d)
	}
}

// TestReuseRejectsInvalid: a pushed eStargz layer whose tar breaks the
// rules of a conversion, or whose diff_id is not the config's, fails as
// invalid like its conversion would, whatever its TOC says.
func TestReuseRejectsInvalid(t *testing.T) {
	reg := func(name, data string) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: baseTime}, data: []byte(data)}
	}
	good := buildTar(t, []tarEntry{reg("a", "x")})
	for _, tc := range []struct {
		name   string
		tar    []byte
		diffID func(blob []byte) digest.Digest
		want   string
	}{
		{"file as parent", buildTar(t, []tarEntry{reg("a", "x"), reg("a/b", "y")}), nil, `its parent "a" is not a directory`},
		{"symlink parent", buildTar(t, []tarEntry{{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "l", Linkname: "/etc"}}, reg("l/passwd", "x")}), nil, "symlink"},
		{"diff_id", good, func([]byte) digest.Digest { return digest.FromString("other") }, "does not match the config's diff_id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blob, toc := estargzBlob(t, tc.tar)
			diffID := uncompressed(t, blob)
			if tc.diffID != nil {
				diffID = tc.diffID(blob)
			}
			s := newMemStore()
			src := addEStargzImage(t, s, blob, toc, diffID)
			opts, tmps := testOptions(t)
			_, err := ConvertImage(context.Background(), s, src, opts)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v: want ErrInvalid with %q", err, tc.want)
			}
			for _, d := range tmps {
				assertEmptyDir(t, d)
			}
		})
	}
}
