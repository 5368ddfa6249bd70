package convert

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"math/rand"
	"os"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

// testChunkSize keeps test layers small while still splitting files into
// several chunks.
const testChunkSize = 4096

// tarEntry is one entry of a generated test tar.
type tarEntry struct {
	hdr  tar.Header
	data []byte
}

var baseTime = time.Date(2023, 5, 17, 10, 20, 30, 0, time.UTC)

// pseudoRandom returns n deterministic, moderately compressible bytes.
func pseudoRandom(seed int64, n int) []byte {
	r := rand.New(rand.NewSource(seed))
	words := []string{"container ", "layer ", "starlight ", "registry ", "chunk ", "\n", "0x", "gzip "}
	var b bytes.Buffer
	for b.Len() < n {
		if r.Intn(4) == 0 {
			b.WriteByte(byte(r.Intn(256)))
		} else {
			b.WriteString(words[r.Intn(len(words))])
		}
	}
	return b.Bytes()[:n]
}

// trickyEntries is a layer exercising every entry type and metadata field
// a layer can carry.
func trickyEntries() []tarEntry {
	i := 0
	mt := func() time.Time { i++; return baseTime.Add(time.Duration(i) * time.Second) }
	dir := func(name string, mode int64) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, ModTime: mt()}}
	}
	reg := func(name string, mode int64, data []byte) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: mt()}, data: data}
	}
	setuid := reg("bin/su", 04755, []byte("#!/bin/sh\necho su\n"))
	setuid.hdr.Uid, setuid.hdr.Gid = 0, 0
	owned := reg("home/user/.profile", 0600, []byte("export PATH=/bin\n"))
	owned.hdr.Uid, owned.hdr.Gid, owned.hdr.Uname, owned.hdr.Gname = 1000, 2000, "user", "users"
	nobody := reg("home/nobody", 0640, []byte("x"))
	nobody.hdr.Uid, nobody.hdr.Gid = 65534, 65533
	xattrs := reg("bin/ping", 0755, pseudoRandom(7, 3000))
	xattrs.hdr.PAXRecords = map[string]string{
		"SCHILY.xattr.user.foo":            "bar",
		"SCHILY.xattr.security.capability": string([]byte{1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}),
	}
	xattrs.hdr.Format = tar.FormatPAX
	subsec := reg("etc/subsecond", 0644, []byte("mtime with nanoseconds\n"))
	subsec.hdr.ModTime = baseTime.Add(1234567891 * time.Nanosecond)
	subsec.hdr.Format = tar.FormatPAX
	dev := func(typ byte, name string, major, minor int64) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: typ, Name: name, Mode: 0660, Devmajor: major, Devminor: minor, ModTime: mt()}}
	}
	return []tarEntry{
		dir("./", 0755),
		dir("./etc/", 0755),
		reg("./etc/passwd", 0644, []byte("root:x:0:0:root:/root:/bin/sh\n")),
		reg("etc/empty", 0644, nil),
		subsec,
		reg("etc/exact-chunk", 0644, pseudoRandom(2, testChunkSize)),
		dir("bin", 0755),
		setuid,
		reg("bin/wall", 02755, []byte("wall")),
		xattrs,
		reg("bin/big", 0755, pseudoRandom(1, 3*testChunkSize+123)),
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "bin/big-link", Linkname: "./bin/big", ModTime: mt()}},
		{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "etc/passwd-", Linkname: "etc/passwd", ModTime: mt()}},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "bin/sh", Linkname: "busybox", Mode: 0777, ModTime: mt()}},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "etc/rel", Linkname: "../bin/big", Mode: 0777, ModTime: mt()}},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "etc/abs", Linkname: "/etc/passwd", Mode: 0777, ModTime: mt()}},
		dir("tmp", 01777),
		dir("home", 0755),
		dir("home/user", 0700),
		owned,
		nobody,
		reg(".wh.removed", 0, nil),
		dir("var", 0755),
		dir("var/opaque", 0755),
		reg("var/opaque/.wh..wh..opq", 0, nil),
		reg("var/opaque/kept", 0644, []byte("kept")),
		dir("dev", 0755),
		dev(tar.TypeChar, "dev/null", 1, 3),
		dev(tar.TypeBlock, "dev/sda", 8, 0),
		dev(tar.TypeFifo, "dev/initctl", 0, 0),
	}
}

func buildTar(t testing.TB, entries []tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("writing %s: %v", h.Name, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			t.Fatalf("writing %s: %v", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func gzipBytes(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func zstdBytes(t testing.TB, b []byte) []byte {
	t.Helper()
	zw, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer zw.Close()
	return zw.EncodeAll(b, nil)
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// assertEmptyDir fails if a conversion left files behind in dir.
func assertEmptyDir(t *testing.T, dir string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		t.Errorf("temporary file left behind: %s/%s", dir, e.Name())
	}
}

// testOptions returns conversion options whose temporary files go to a
// private dir, and points os.TempDir (used by estargz) to another one.
func testOptions(t *testing.T) (Options, []string) {
	tmp, etmp := t.TempDir(), t.TempDir()
	t.Setenv("TMPDIR", etmp)
	return Options{ChunkSize: testChunkSize, TempDir: tmp, Parallelism: 2}, []string{tmp, etmp}
}
