package convert

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"os"
	"path"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
)

func TestConvertLayerRoundTrip(t *testing.T) {
	entries := trickyEntries()
	plain := buildTar(t, entries)
	for _, tc := range []struct {
		name  string
		input []byte
	}{
		{"tar", plain},
		{"gzip", gzipBytes(t, plain)},
		{"zstd", zstdBytes(t, plain)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts, tmps := testOptions(t)
			l, err := ConvertLayer(context.Background(), bytes.NewReader(tc.input), opts)
			if err != nil {
				t.Fatalf("ConvertLayer: %v", err)
			}
			blob, err := io.ReadAll(l.File)
			if err != nil {
				t.Fatal(err)
			}
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			for _, d := range tmps {
				assertEmptyDir(t, d)
			}

			if got := digest.FromBytes(blob); got != l.Desc.Digest || int64(len(blob)) != l.Desc.Size {
				t.Errorf("descriptor %s/%d, blob %s/%d", l.Desc.Digest, l.Desc.Size, got, len(blob))
			}
			if l.SourceDiffID != digest.FromBytes(plain) {
				t.Errorf("SourceDiffID %s, want %s", l.SourceDiffID, digest.FromBytes(plain))
			}
			if l.Desc.MediaType != "application/vnd.oci.image.layer.v1.tar+gzip" ||
				l.Desc.Annotations[AnnotationTOCDigest] != l.Index.TOCDigest.String() {
				t.Errorf("descriptor %+v", l.Desc)
			}
			checkTarRoundTrip(t, entries, blob, l)
			checkIndex(t, entries, blob, l.Index)
		})
	}
}

// checkTarRoundTrip reads the converted blob as a standard client would
// and compares every entry with the source.
func checkTarRoundTrip(t *testing.T, want []tarEntry, blob []byte, l *Layer) {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(blob))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatalf("gunzip converted blob: %v", err)
	}
	if got := digest.FromBytes(raw); got != l.DiffID {
		t.Errorf("DiffID %s, uncompressed blob %s", l.DiffID, got)
	}
	if l.Index.UncompressedSize != int64(len(raw)) {
		t.Errorf("UncompressedSize %d, want %d", l.Index.UncompressedSize, len(raw))
	}
	tr := tar.NewReader(bytes.NewReader(raw))
	var got []tarEntry
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("reading converted tar: %v", err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if IsMetadataEntry(h.Name) {
			continue
		}
		got = append(got, tarEntry{hdr: *h, data: data})
	}
	if len(got) != len(want) {
		t.Fatalf("converted tar has %d entries, want %d", len(got), len(want))
	}
	for i := range want {
		w, g := want[i].hdr, got[i].hdr
		if g.Name != w.Name || g.Typeflag != w.Typeflag || g.Mode != w.Mode || g.Uid != w.Uid || g.Gid != w.Gid ||
			g.Size != w.Size || !g.ModTime.Equal(w.ModTime) || g.Linkname != w.Linkname ||
			g.Devmajor != w.Devmajor || g.Devminor != w.Devminor {
			t.Errorf("entry %d: got %+v\nwant %+v", i, g, w)
		}
		for k, v := range w.PAXRecords {
			if g.PAXRecords[k] != v {
				t.Errorf("%s: PAX record %s = %q, want %q", w.Name, k, g.PAXRecords[k], v)
			}
		}
		if !bytes.Equal(got[i].data, want[i].data) {
			t.Errorf("%s: content differs", w.Name)
		}
	}
}

// checkIndex compares the index with the source tar and decodes every
// chunk from the blob the way the worker does.
func checkIndex(t *testing.T, want []tarEntry, blob []byte, idx *Index) {
	t.Helper()
	byName := map[string]api.Entry{}
	for _, e := range idx.Entries {
		if IsMetadataEntry(e.Name) {
			t.Errorf("index lists eStargz metadata entry %s", e.Name)
		}
		byName[e.Name] = e
	}
	n := 0
	for _, te := range want {
		h := te.hdr
		name := strings.TrimPrefix(path.Clean(h.Name), "./")
		if name == "." {
			continue
		}
		n++
		e, ok := byName[name]
		if !ok {
			t.Errorf("index lacks %s", name)
			continue
		}
		if e.Type != tocType(h.Typeflag) || e.Mode != uint32(h.Mode&07777) || e.UID != h.Uid || e.GID != h.Gid ||
			!e.ModTime.Equal(h.ModTime.Round(time.Second)) || e.DevMajor != h.Devmajor || e.DevMinor != h.Devminor {
			t.Errorf("%s: index entry %+v does not match header %+v", name, e, h)
		}
		switch h.Typeflag {
		case tar.TypeReg:
			if e.Size != h.Size {
				t.Errorf("%s: size %d, want %d", name, e.Size, h.Size)
			}
			if h.Size > 0 && e.Digest != sha256Hex(te.data) {
				t.Errorf("%s: digest %s, want %s", name, e.Digest, sha256Hex(te.data))
			}
			if h.Size == 0 && (e.Digest != "" || len(e.Chunks) != 0) {
				t.Errorf("%s: empty file with content %+v", name, e)
			}
			if wantChunks := (h.Size + testChunkSize - 1) / testChunkSize; int64(len(e.Chunks)) != wantChunks {
				t.Errorf("%s: %d chunks, want %d", name, len(e.Chunks), wantChunks)
			}
			for _, c := range e.Chunks {
				if c.CompressedOffset < 0 || c.CompressedOffset+c.CompressedSize > int64(len(blob)) {
					t.Fatalf("%s: chunk %+v outside the blob", name, c)
				}
				raw := blob[c.CompressedOffset : c.CompressedOffset+c.CompressedSize]
				f := api.Frame{Digest: e.Digest, Offset: c.Offset, Size: c.Size, ChunkDigest: c.Digest, CompressedSize: c.CompressedSize}
				r, err := bundle.Decode(f, bytes.NewReader(raw))
				if err != nil {
					t.Fatalf("%s: decode chunk at %d: %v", name, c.Offset, err)
				}
				data, err := io.ReadAll(r)
				if err != nil {
					t.Fatalf("%s: decode chunk at %d: %v", name, c.Offset, err)
				}
				if !bytes.Equal(data, te.data[c.Offset:c.Offset+c.Size]) {
					t.Errorf("%s: chunk at %d has the wrong content", name, c.Offset)
				}
			}
		case tar.TypeLink:
			if e.LinkName != strings.TrimPrefix(path.Clean(h.Linkname), "./") {
				t.Errorf("%s: hard link to %q, want %q", name, e.LinkName, h.Linkname)
			}
		case tar.TypeSymlink:
			if e.LinkName != h.Linkname {
				t.Errorf("%s: symlink to %q, want %q", name, e.LinkName, h.Linkname)
			}
		}
		for k, v := range h.PAXRecords {
			if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok && string(e.Xattrs[x]) != v {
				t.Errorf("%s: xattr %s = %q, want %q", name, x, e.Xattrs[x], v)
			}
		}
	}
	if n != len(idx.Entries) {
		t.Errorf("index has %d entries, want %d", len(idx.Entries), n)
	}
}

func tocType(flag byte) string {
	return map[byte]string{
		tar.TypeReg: api.TypeReg, tar.TypeDir: api.TypeDir, tar.TypeSymlink: api.TypeSymlink,
		tar.TypeLink: api.TypeHardlink, tar.TypeChar: api.TypeChar, tar.TypeBlock: api.TypeBlock, tar.TypeFifo: api.TypeFifo,
	}[flag]
}

func TestConvertLayerDeterministic(t *testing.T) {
	input := gzipBytes(t, buildTar(t, trickyEntries()))
	var digests []digest.Digest
	for _, par := range []int{1, 4} {
		opts, _ := testOptions(t)
		opts.Parallelism = par
		l, err := ConvertLayer(context.Background(), bytes.NewReader(input), opts)
		if err != nil {
			t.Fatal(err)
		}
		digests = append(digests, l.Desc.Digest)
		l.Close()
	}
	if digests[0] != digests[1] {
		t.Errorf("two conversions of the same layer differ: %v", digests)
	}
}

func TestConvertLayerRejects(t *testing.T) {
	reg := func(name string) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0644, Size: 2}, data: []byte("hi")}
	}
	link := func(typ byte, name, target string) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: typ, Name: name, Linkname: target}}
	}
	dir := func(name string) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0755}}
	}
	good := buildTar(t, []tarEntry{reg("a"), reg("b")})
	goodGz := gzipBytes(t, good)
	// A tar cut inside the content of its second entry.
	truncTar := good[:512+512+512+1]

	for _, tc := range []struct {
		name  string
		input []byte
		want  string // substring of the error
	}{
		{"empty", nil, "empty"},
		{"garbage", bytes.Repeat([]byte("not a tar at all, just text. "), 100), "invalid tar header"},
		{"short garbage", []byte("hello"), "tar truncated"},
		{"bad gzip header", []byte{0x1f, 0x8b, 0x08, 0xff, 1, 2, 3}, "gzip"},
		{"truncated gzip", goodGz[:len(goodGz)/2], "unexpected EOF"},
		{"gzip trailer cut", goodGz[:len(goodGz)-4], "unexpected EOF"},
		{"truncated tar", truncTar, `tar truncated in or after entry "b"`},
		{"dotdot", buildTar(t, []tarEntry{reg("../escape")}), `entry "../escape": path escapes`},
		{"inner dotdot", buildTar(t, []tarEntry{reg("a/../../escape")}), "escapes"},
		{"absolute", buildTar(t, []tarEntry{reg("/abs")}), `entry "/abs": absolute path`},
		{"hard link escape", buildTar(t, []tarEntry{reg("a"), link(tar.TypeLink, "passwd", "../../etc/passwd")}), `hard link "passwd" to "../../etc/passwd"`},
		{"hard link absolute", buildTar(t, []tarEntry{link(tar.TypeLink, "passwd", "/etc/passwd")}), "absolute"},
		{"hard link forward", buildTar(t, []tarEntry{link(tar.TypeLink, "l", "later"), reg("later")}), "not an earlier entry"},
		{"hard link to root", buildTar(t, []tarEntry{link(tar.TypeLink, "l", "./")}), "root"},
		{"write through symlink", buildTar(t, []tarEntry{link(tar.TypeSymlink, "a", "/etc"), reg("a/passwd")}), `entry "a/passwd": its parent "a" is a symlink`},
		{"write through nested symlink", buildTar(t, []tarEntry{link(tar.TypeSymlink, "a", "."), reg("a/b/c")}), `parent "a" is a symlink`},
		{"hard link through symlink", buildTar(t, []tarEntry{link(tar.TypeSymlink, "a", "/etc"), link(tar.TypeLink, "b", "a/passwd")}), "not an earlier entry"},
		{"unknown type", buildTar(t, []tarEntry{{hdr: tar.Header{Typeflag: 'Z', Name: "odd"}}}), `entry "odd": unsupported entry type`},
		{"root not a dir", buildTar(t, []tarEntry{reg(".")}), "root"},
		{"redefined hard link target", buildTar(t, []tarEntry{reg("a"), link(tar.TypeLink, "b", "a"), reg("a")}), "redefines"},
		{"file as parent", buildTar(t, []tarEntry{reg("a"), reg("a/b")}), `entry "a/b": its parent "a" is not a directory: an earlier entry of the layer made it a regular file`},
		{"nested file as parent", buildTar(t, []tarEntry{dir("d"), reg("d/f"), reg("d/f/g/h")}), `its parent "d/f" is not a directory`},
		{"hard link as parent", buildTar(t, []tarEntry{reg("a"), link(tar.TypeLink, "b", "a"), reg("b/c")}), `its parent "b" is not a directory: an earlier entry of the layer made it a hard link`},
		{"device as parent", buildTar(t, []tarEntry{{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "null", Devmajor: 1, Devminor: 3}}, dir("null/x")}), "made it a character device"},
		{"whiteout as parent", buildTar(t, []tarEntry{reg(".wh.a"), reg("a/b")}), "made it a whiteout"},
		{"hard link to a whiteout", buildTar(t, []tarEntry{reg(".wh.a"), link(tar.TypeLink, "b", "a")}), "the target is a whiteout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts, tmps := testOptions(t)
			l, err := ConvertLayer(context.Background(), bytes.NewReader(tc.input), opts)
			if err == nil {
				l.Close()
				t.Fatalf("ConvertLayer accepted the layer")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("error %q is not ErrInvalid: the job would be retried", err)
			}
			for _, d := range tmps {
				assertEmptyDir(t, d)
			}
		})
	}
}

func TestConvertLayerCancelled(t *testing.T) {
	opts, tmps := testOptions(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := ConvertLayer(ctx, bytes.NewReader(buildTar(t, trickyEntries())), opts)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	for _, d := range tmps {
		assertEmptyDir(t, d)
	}
}

func TestIsMetadataEntry(t *testing.T) {
	for name, want := range map[string]bool{
		".no.prefetch.landmark": true, "./.prefetch.landmark": true, "stargz.index.json": true,
		"etc/stargz.index.json": false, "landmark": false,
	} {
		if got := IsMetadataEntry(name); got != want {
			t.Errorf("IsMetadataEntry(%q) = %v", name, got)
		}
	}
}

func TestReadIndexRejects(t *testing.T) {
	opts, _ := testOptions(t)
	l, err := ConvertLayer(context.Background(), bytes.NewReader(buildTar(t, trickyEntries())), opts)
	if err != nil {
		t.Fatal(err)
	}
	blob, _ := io.ReadAll(l.File)
	l.Close()
	for _, tc := range []struct {
		name string
		blob []byte
	}{
		{"empty", nil},
		{"plain gzip", gzipBytes(t, []byte("hello"))},
		{"truncated", blob[:len(blob)-10]},
		{"no footer", blob[:len(blob)-51]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := ReadIndex(bytes.NewReader(tc.blob), int64(len(tc.blob))); err == nil {
				t.Error("ReadIndex accepted the blob")
			}
		})
	}
	if _, err := ReadIndex(bytes.NewReader(blob), int64(len(blob))); err != nil {
		t.Errorf("ReadIndex: %v", err)
	}
	_ = os.Remove
}

// GNU tar pads an archive with zeros up to its 10240-byte record size after
// the end-of-archive marker; the diff_id in an image config covers that
// padding, so the source diff_id must too.
func TestConvertLayerDiffIDCoversTarPadding(t *testing.T) {
	plain := buildTar(t, trickyEntries())
	if rem := len(plain) % 10240; rem != 0 {
		plain = append(plain, make([]byte, 10240-rem)...)
	}
	plain = append(plain, make([]byte, 10240)...)
	opts, _ := testOptions(t)
	l, err := ConvertLayer(context.Background(), bytes.NewReader(gzipBytes(t, plain)), opts)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if want := digest.FromBytes(plain); l.SourceDiffID != want {
		t.Errorf("SourceDiffID %s, want %s (the padded stream)", l.SourceDiffID, want)
	}
}
