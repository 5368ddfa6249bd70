package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"

	"github.com/starlight-project/starlight/api"
)

// The fuzz targets of the conversion's validation of untrusted layers. Their
// seed corpus is committed under testdata/fuzz/<target> (written from
// fuzzSeedTars and fuzzSeedBlobs by TestWriteFuzzCorpus); plain `go test`
// runs every seed. Fuzz with, for example,
//
//	go test ./convert -run '^$' -fuzz FuzzTarValidation -fuzztime 60s -fuzzminimizetime 1x
//
// (a conversion per input makes go's default minimisation of every new
// input take most of the time) and commit an input that fails (go test
// writes it to testdata/fuzz). FuzzReadIndex found that estargz's footer
// parser panics on a crafted footer (seed footer-extra-too-short).

// fuzzOptions bound what one input may make a target do.
var fuzzOptions = Options{MaxUncompressedSize: 4 << 20, MaxEntries: 2000}

// fuzzSeedTars are the tars (uncompressed) every target starts from.
func fuzzSeedTars(t testing.TB) [][]byte {
	reg := func(name, data string) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: baseTime}, data: []byte(data)}
	}
	link := func(typ byte, name, target string) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: typ, Name: name, Linkname: target, ModTime: baseTime}}
	}
	return [][]byte{
		buildTar(t, trickyEntries()),
		buildTar(t, []tarEntry{reg("a", "x"), reg("a/b", "y")}),
		buildTar(t, []tarEntry{reg(".wh.a", ""), reg("a/b", "y")}),
		buildTar(t, []tarEntry{link(tar.TypeSymlink, "l", "/etc"), reg("l/passwd", "x")}),
		buildTar(t, []tarEntry{reg("a", "x"), link(tar.TypeLink, "b", "a"), reg("a", "z")}),
		buildTar(t, []tarEntry{reg("../x", "x")}),
		buildTar(t, []tarEntry{reg("big", string(pseudoRandom(9, 3*testChunkSize+1)))}),
		buildTar(t, []tarEntry{reg(".wh.", ""), reg("d/.wh..", "")}),
		buildTar(t, []tarEntry{reg("d/f", "x"), reg("d/.wh.f", ""), link(tar.TypeLink, "l", "d/f")}),
	}
}

// FuzzTarValidation feeds arbitrary bytes to a conversion (gzip, zstd or
// plain tar) and its validation. Every rejection of a layer held in memory
// must be ErrInvalid (anything else would be retried as a storage fault),
// and the index of every layer it converts must build the tree the worker
// builds (fuzzTree) without error: a layer that converts to "ready" is a
// layer the worker can mount.
func FuzzTarValidation(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		_, idx, err := buildEStargz(data)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("a layer in memory failed with a retryable error: %v", err)
			}
			return
		}
		if err := fuzzTree(idx.Entries); err != nil {
			t.Fatalf("converted a layer the worker cannot build: %v", err)
		}
	})
}

// fuzzTree applies index entries as the worker's tree builder does
// (worker/fs buildTree: missing parents are directories, nothing may be
// below a non-directory, ".wh.NAME" puts a whiteout at NAME, a later entry
// replaces an earlier one, a hard link names an existing non-directory)
// and returns its error.
func fuzzTree(entries []api.Entry) error {
	types := map[string]string{"": api.TypeDir}
	parent := func(p string) string {
		if p = path.Dir(p); p == "." {
			return ""
		}
		return p
	}
	replace := func(name, t string) {
		if old, ok := types[name]; ok && !(old == api.TypeDir && t == api.TypeDir) {
			for n := range types {
				if strings.HasPrefix(n, name+"/") {
					delete(types, n)
				}
			}
		}
		types[name] = t
	}
	for _, e := range entries {
		if err := e.Validate(); err != nil {
			return err
		}
		if IsMetadataEntry(e.Name) {
			continue
		}
		dir := parent(e.Name)
		for p := dir; p != ""; p = parent(p) {
			if t, ok := types[p]; ok && t != api.TypeDir {
				return fmt.Errorf("%s: parent %s is not a directory", e.Name, p)
			}
		}
		for p := dir; p != ""; p = parent(p) {
			types[p] = api.TypeDir
		}
		base := path.Base(e.Name)
		switch {
		case base == api.WhiteoutOpaque:
		case strings.HasPrefix(base, api.WhiteoutPrefix):
			hidden := strings.TrimPrefix(base, api.WhiteoutPrefix)
			if hidden == "" || hidden == "." || hidden == ".." {
				return fmt.Errorf("%s: invalid whiteout", e.Name)
			}
			replace(path.Join(dir, hidden), api.TypeChar)
		case e.Type == api.TypeHardlink:
			t, ok := types[e.LinkName]
			if !ok || t == api.TypeDir {
				return fmt.Errorf("%s: hard link target %s is not a file", e.Name, e.LinkName)
			}
			replace(e.Name, t)
		default:
			replace(e.Name, e.Type)
		}
	}
	return nil
}

// fuzzSeedBlobs are eStargz blobs: converted by Starlight, built by
// estargz, and with TOCs that lie.
func fuzzSeedBlobs(t testing.TB) [][]byte {
	var out [][]byte
	for _, tb := range fuzzSeedTars(t) {
		if blob, _, err := buildEStargz(tb); err == nil {
			out = append(out, blob)
		}
		// estargz's builder takes tars a conversion refuses: their TOCs
		// tell the truth about tars that break the rules.
		b, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tb), 0, int64(len(tb))), estargz.WithChunkSize(testChunkSize))
		if err == nil {
			if blob, err := io.ReadAll(b); err == nil {
				out = append(out, blob)
			}
			b.Close()
		}
	}
	lie, _ := rewriteTOC(t, out[0], func(toc *estargz.JTOC) {
		for _, e := range toc.Entries {
			if e.Type == "reg" && e.Size > 0 {
				e.Digest = sha256Hex([]byte("lie"))
			}
		}
	})
	return append(out, lie)
}

// buildEStargz converts a tar with the fuzz options and returns the blob
// and its index.
func buildEStargz(tb []byte) ([]byte, *Index, error) {
	opts := fuzzOptions
	opts.ChunkSize, opts.Parallelism = testChunkSize, 1
	l, err := ConvertLayer(context.Background(), bytes.NewReader(tb), opts)
	if err != nil {
		return nil, nil, err
	}
	defer l.Close()
	blob, err := io.ReadAll(l.File)
	return blob, l.Index, err
}

// FuzzReadIndex feeds arbitrary blobs to ReadIndex, which parses the
// footer and TOC of a pushed eStargz layer. What it accepts must be
// entries the worker can take (api.Entry.Validate), each named once, whose
// chunks lie inside the blob.
func FuzzReadIndex(f *testing.F) {
	f.Fuzz(func(t *testing.T, blob []byte) {
		idx, err := ReadIndex(bytes.NewReader(blob), int64(len(blob)))
		if err != nil {
			return
		}
		seen := map[string]bool{}
		for _, e := range idx.Entries {
			if err := e.Validate(); err != nil {
				t.Fatalf("accepted an invalid entry: %v", err)
			}
			if seen[e.Name] {
				t.Fatalf("accepted %q twice", e.Name)
			}
			seen[e.Name] = true
			for _, c := range e.Chunks {
				if c.CompressedOffset <= 0 || c.CompressedSize <= 0 || c.CompressedOffset+c.CompressedSize > int64(len(blob)) {
					t.Fatalf("%s: chunk at %d located at %d+%d in a blob of %d bytes", e.Name, c.Offset, c.CompressedOffset, c.CompressedSize, len(blob))
				}
			}
		}
	})
}

// FuzzVerifyEStargz feeds arbitrary blobs to the verification of a pushed
// eStargz layer. Whatever it keeps, the worker (its index, chunks decoded
// from their members) must see exactly what docker pull unpacks from its
// tar; whatever it refuses must be refused as invalid or not reusable.
func FuzzVerifyEStargz(f *testing.F) {
	f.Fuzz(func(t *testing.T, blob []byte) {
		idx, err := ReadIndex(bytes.NewReader(blob), int64(len(blob)))
		if err != nil {
			return
		}
		_, _, err = verifyEStargz(context.Background(), bytes.NewReader(blob), int64(len(blob)), idx, fuzzOptions)
		if err != nil {
			if !errors.Is(err, ErrInvalid) && !errors.Is(err, errNotReusable) {
				t.Fatalf("a blob in memory failed with a retryable error: %v", err)
			}
			return
		}
		if got, want := workerView(t, blob, idx), dockerView(t, blob); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("kept a layer the worker sees as\n%v\nand docker pull as\n%v", got, want)
		}
	})
}

// TestFuzzCorpus checks that the committed corpus in testdata/fuzz holds
// the seeds above; with STARLIGHT_WRITE_FUZZ_CORPUS=1 it writes them
// there instead.
func TestFuzzCorpus(t *testing.T) {
	rewrite := os.Getenv("STARLIGHT_WRITE_FUZZ_CORPUS") == "1"
	write := func(target string, seeds [][]byte) {
		dir := filepath.Join("testdata", "fuzz", target)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for i, s := range seeds {
			b := fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", s)
			path := filepath.Join(dir, fmt.Sprintf("seed-%02d", i))
			if rewrite {
				if err := os.WriteFile(path, b, 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, b) {
				t.Errorf("%s is not seed %d of %s (%v): run STARLIGHT_WRITE_FUZZ_CORPUS=1 go test -run TestFuzzCorpus ./convert", path, i, target, err)
			}
		}
	}
	var tars [][]byte
	for _, tb := range fuzzSeedTars(t) {
		tars = append(tars, tb, gzipBytes(t, tb))
	}
	write("FuzzTarValidation", tars)
	write("FuzzReadIndex", fuzzSeedBlobs(t))
	write("FuzzVerifyEStargz", fuzzSeedBlobs(t))
}
