package predict

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/convert"
)

// testChunkSize splits the libraries into many chunks, so the ELF
// parser's reads of the dynamic section land in later chunks.
const testChunkSize = 64 << 10

// memBlobs is an in-memory BlobOpener that counts opens.
type memBlobs struct {
	blobs map[digest.Digest][]byte
	opens atomic.Int64
}

type nopCloser struct{ *bytes.Reader }

func (nopCloser) Close() error { return nil }

func (b *memBlobs) OpenBlob(_ context.Context, _ string, d digest.Digest) (io.ReadSeekCloser, error) {
	b.opens.Add(1)
	blob, ok := b.blobs[d]
	if !ok {
		return nil, fmt.Errorf("blob %s: %w", d, fs.ErrNotExist)
	}
	return nopCloser{bytes.NewReader(blob)}, nil
}

// tfile is one entry of a test layer tar.
type tfile struct {
	name string
	typ  byte // tar type; 0: regular
	body []byte
	link string
	mode int64 // 0: 0755
}

// layerBuilder collects the entries of one test layer, once per name.
type layerBuilder struct {
	files []tfile
	seen  map[string]bool
}

func (l *layerBuilder) add(f tfile) {
	if l.seen == nil {
		l.seen = map[string]bool{}
	}
	if l.seen[f.name] {
		return
	}
	l.seen[f.name] = true
	l.files = append(l.files, f)
}

func (l *layerBuilder) dirs(name string) {
	if d := filepath.Dir(name); d != "." && d != "/" {
		l.dirs(d)
		l.add(tfile{name: d + "/", typ: tar.TypeDir})
	}
}

func (l *layerBuilder) file(name string, body []byte) {
	l.dirs(name)
	l.add(tfile{name: name, body: body})
}

func (l *layerBuilder) script(name, body string) { l.file(name, []byte(body)) }

func (l *layerBuilder) symlink(name, target string) {
	l.dirs(name)
	l.add(tfile{name: name, typ: tar.TypeSymlink, link: target})
}

// host copies the host file at p into the layer as the host lays it out:
// every symlink on its path as a symlink (with its own target), the file
// itself where the links lead. So /lib64/ld-linux-x86-64.so.2 on a
// usrmerged Debian becomes lib64 → usr/lib64, usr/lib64/ld-linux-x86-64.so.2
// → /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2, lib → usr/lib and the
// loader at usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2.
func (l *layerBuilder) host(t *testing.T, p string) {
	t.Helper()
	l.hostAt(t, "/", strings.Split(strings.TrimPrefix(filepath.Clean(p), "/"), "/"), 0)
}

func (l *layerBuilder) hostAt(t *testing.T, cur string, comps []string, depth int) {
	t.Helper()
	if depth > 40 {
		t.Fatalf("symlink loop on the host at %s", cur)
	}
	for i, c := range comps {
		next := filepath.Join(cur, c)
		fi, err := os.Lstat(next)
		if err != nil {
			t.Skipf("host file %s: %v", next, err)
		}
		name := strings.TrimPrefix(next, "/")
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(next)
			if err != nil {
				t.Fatal(err)
			}
			l.symlink(name, target)
			base := cur
			if filepath.IsAbs(target) {
				base = "/"
			}
			rest := append(strings.Split(target, "/"), comps[i+1:]...)
			l.hostAt(t, base, rest, depth+1)
			return
		case fi.IsDir():
			if i == len(comps)-1 {
				l.add(tfile{name: name + "/", typ: tar.TypeDir})
			}
			cur = next
		default:
			body, err := os.ReadFile(next)
			if err != nil {
				t.Skipf("host file %s: %v", next, err)
			}
			l.file(name, body)
			return
		}
	}
}

// convert converts the layer as the registry does and stores its blob.
func (l *layerBuilder) convert(t *testing.T, blobs *memBlobs) api.LayerTree {
	t.Helper()
	return l.convertChunks(t, blobs, testChunkSize)
}

func (l *layerBuilder) convertChunks(t *testing.T, blobs *memBlobs, chunkSize int) api.LayerTree {
	t.Helper()
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	for _, f := range l.files {
		mode := f.mode
		if mode == 0 {
			mode = 0o755
		}
		h := &tar.Header{Name: f.name, Mode: mode, Typeflag: f.typ, Linkname: f.link,
			ModTime: time.Unix(1_600_000_000, 0), Format: tar.FormatPAX}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(f.body))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(f.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	layer, err := convert.ConvertLayer(context.Background(), &tb, convert.Options{ChunkSize: chunkSize, TempDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer layer.Close()
	blob, err := io.ReadAll(layer.File)
	if err != nil {
		t.Fatal(err)
	}
	blobs.blobs[layer.Desc.Digest] = blob
	return api.LayerTree{Digest: layer.Desc.Digest.String(), Entries: layer.Index.Entries}
}

// hostReal is the name of the host file p resolves to, relative to the
// root, as the prediction names it.
func hostReal(t *testing.T, p string) string {
	t.Helper()
	r, err := filepath.EvalSymlinks(p)
	if err != nil {
		t.Skipf("host file %s: %v", p, err)
	}
	return strings.TrimPrefix(r, "/")
}

// requireDebianHost skips unless the host has the dynamic binaries and
// the glibc layout the ELF tests copy (Debian or Ubuntu on amd64).
func requireDebianHost(t *testing.T) {
	t.Helper()
	if runtime.GOARCH != "amd64" {
		t.Skip("the ELF fixtures are the host's amd64 binaries")
	}
	for _, p := range []string{"/usr/bin/bash", "/usr/bin/true", "/usr/bin/env", "/bin/sh",
		"/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libtinfo.so.6"} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("host lacks %s", p)
		}
	}
	f, err := elf.Open("/usr/bin/bash")
	if err != nil {
		t.Skip(err)
	}
	defer f.Close()
	if libs, _ := f.ImportedLibraries(); !slices.Equal(libs, []string{"libtinfo.so.6", "libc.so.6"}) {
		t.Skipf("host bash needs %v", libs)
	}
}

// glibcBase is a base layer with the host's loader, libc, libtinfo, the
// programs the tests run and, when cache, the host's ld.so.cache, after
// a filler file that layer order would send first.
func glibcBase(t *testing.T, cache bool) *layerBuilder {
	t.Helper()
	l := &layerBuilder{}
	l.file("aaa/filler", bytes.Repeat([]byte("filler "), 10000))
	for _, p := range []string{"/usr/bin/bash", "/usr/bin/true", "/usr/bin/env", "/bin/sh", "/bin/bash",
		"/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libtinfo.so.6"} {
		l.host(t, p)
	}
	if cache {
		l.host(t, "/etc/ld.so.cache")
	}
	return l
}

func predictNames(t *testing.T, blobs *memBlobs, cfg ocispec.ImageConfig, layers ...api.LayerTree) ([]string, *Result) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := Predict(ctx, blobs, Image{Repository: "library/test", Config: cfg, Layers: layers}, DefaultLimits)
	if err != nil {
		t.Fatalf("Predict: %v", err)
	}
	byLayer := map[string]map[string]api.Entry{}
	for _, l := range layers {
		m := map[string]api.Entry{}
		for _, e := range l.Entries {
			m[e.Name] = e
		}
		byLayer[l.Digest] = m
	}
	var names []string
	for i, a := range res.Accesses {
		e, ok := byLayer[a.Layer][a.Name]
		switch {
		case !ok:
			t.Errorf("access %d %s: no such entry in layer %s", i, a.Name, a.Layer)
		case e.Type != api.TypeReg || e.Digest != a.Digest || a.ChunkOffset != 0:
			t.Errorf("access %d %s: %+v does not name the content of a regular file", i, a.Name, a)
		case i > 0 && a.TimeNS <= res.Accesses[i-1].TimeNS:
			t.Errorf("access %d: time %d does not follow %d", i, a.TimeNS, res.Accesses[i-1].TimeNS)
		}
		names = append(names, a.Name)
	}
	return names, res
}

// TestPredictELFClosureFirst: the prediction of a dynamic program is the
// program, its interpreter (the real file behind /lib64's symlinks), the
// loader cache, then the DT_NEEDED closure breadth first.
func TestPredictELFClosureFirst(t *testing.T) {
	requireDebianHost(t)
	ld := hostReal(t, "/lib64/ld-linux-x86-64.so.2")
	libc := hostReal(t, "/lib/x86_64-linux-gnu/libc.so.6")
	tinfo := hostReal(t, "/lib/x86_64-linux-gnu/libtinfo.so.6")
	bash, dash, truebin, env := hostReal(t, "/usr/bin/bash"), hostReal(t, "/bin/sh"), hostReal(t, "/usr/bin/true"), hostReal(t, "/usr/bin/env")
	const cache = "etc/ld.so.cache"
	const path = "PATH=/usr/local/bin:/usr/bin:/bin"

	for _, tc := range []struct {
		name  string
		cache bool
		chunk int // chunk size of the base layer; testChunkSize when 0
		cfg   ocispec.ImageConfig
		top   func(l *layerBuilder)
		want  []string
	}{
		{name: "entrypoint through PATH", cache: true,
			cfg:  ocispec.ImageConfig{Entrypoint: []string{"bash"}, Cmd: []string{"-l"}, Env: []string{path}},
			want: []string{bash, ld, cache, tinfo, libc}},
		{name: "4 MiB chunks: libc in one chunk", cache: true, chunk: 4 << 20,
			cfg:  ocispec.ImageConfig{Entrypoint: []string{"bash"}, Env: []string{path}},
			want: []string{bash, ld, cache, tinfo, libc}},
		{name: "cmd by absolute path, default PATH, no loader cache",
			cfg:  ocispec.ImageConfig{Cmd: []string{"/bin/bash"}},
			want: []string{bash, ld, tinfo, libc}},
		{name: "LD_LIBRARY_PATH before the cache", cache: true,
			cfg: ocispec.ImageConfig{Cmd: []string{"bash"}, Env: []string{path, "LD_LIBRARY_PATH=/opt/lib"}},
			top: func(l *layerBuilder) {
				b, _ := os.ReadFile("/lib/x86_64-linux-gnu/libtinfo.so.6")
				l.file("opt/lib/libtinfo.so.6", b)
			},
			want: []string{bash, ld, "opt/lib/libtinfo.so.6", cache, libc}},
		{name: "shebang script, then its interpreter's closure", cache: true,
			cfg:  ocispec.ImageConfig{Cmd: []string{"/app/run.sh"}, WorkingDir: "/app"},
			top:  func(l *layerBuilder) { l.script("app/run.sh", "#!/bin/sh -e\nexec true\n") },
			want: []string{"app/run.sh", dash, ld, cache, libc}},
		{name: "relative script in the working directory", cache: true,
			cfg:  ocispec.ImageConfig{Entrypoint: []string{"./run"}, WorkingDir: "/app"},
			top:  func(l *layerBuilder) { l.script("app/run", "#!/usr/bin/env bash\n") },
			want: []string{"app/run", env, ld, cache, libc, bash, tinfo}},
		{name: "sh -c runs the script's first program", cache: true,
			cfg:  ocispec.ImageConfig{Entrypoint: []string{"/bin/sh", "-c"}, Cmd: []string{"set -e; FOO=1 exec bash -l"}, Env: []string{path}},
			want: []string{dash, ld, cache, libc, bash, tinfo}},
		{name: "hard link resolves to its target's content", cache: true,
			cfg: ocispec.ImageConfig{Cmd: []string{"/usr/local/bin/rbash"}},
			top: func(l *layerBuilder) {
				b, _ := os.ReadFile("/usr/bin/bash")
				l.file("usr/local/bin/bash2", b)
				l.add(tfile{name: "usr/local/bin/rbash", typ: tar.TypeLink, link: "usr/local/bin/bash2"})
			},
			want: []string{"usr/local/bin/bash2", ld, cache, tinfo, libc}},
		{name: "an upper layer's file wins", cache: true,
			cfg: ocispec.ImageConfig{Cmd: []string{"true"}, Env: []string{path}},
			top: func(l *layerBuilder) {
				l.script("usr/local/bin/true", "#!/usr/bin/env bash\n")
			},
			want: []string{"usr/local/bin/true", env, ld, cache, libc, bash, tinfo}},
		{name: "not executable: PATH goes on", cache: true,
			cfg: ocispec.ImageConfig{Cmd: []string{"true"}, Env: []string{path}},
			top: func(l *layerBuilder) {
				l.dirs("usr/local/bin/true")
				l.add(tfile{name: "usr/local/bin/true", body: []byte("#!/usr/bin/env bash\n"), mode: 0o644})
			},
			want: []string{truebin, ld, cache, libc}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blobs := &memBlobs{blobs: map[digest.Digest][]byte{}}
			chunk := tc.chunk
			if chunk == 0 {
				chunk = testChunkSize
			}
			layers := []api.LayerTree{glibcBase(t, tc.cache).convertChunks(t, blobs, chunk)}
			if tc.top != nil {
				top := &layerBuilder{}
				tc.top(top)
				layers = append(layers, top.convert(t, blobs))
			}
			got, res := predictNames(t, blobs, tc.cfg, layers...)
			if !slices.Equal(got, tc.want) {
				t.Errorf("prediction\n  %v\nwant\n  %v", got, tc.want)
			}
			if res.Bytes > int64(res.Files)*DefaultLimits.FileBytes {
				t.Errorf("%d bytes decompressed for %d files", res.Bytes, res.Files)
			}
			t.Logf("%d files read, %d bytes decompressed, %d blob opens", res.Files, res.Bytes, blobs.opens.Load())
		})
	}
}

// TestPredictStatic: a static program has no interpreter and no
// libraries; busybox's "sh -c" still names the program it runs.
func TestPredictStatic(t *testing.T) {
	requireDebianHost(t)
	bb, err := os.ReadFile("/usr/bin/busybox")
	if err != nil {
		t.Skip("no busybox on the host")
	}
	if f, err := elf.Open("/usr/bin/busybox"); err != nil {
		t.Skip(err)
	} else {
		interp := slices.ContainsFunc(f.Progs, func(p *elf.Prog) bool { return p.Type == elf.PT_INTERP })
		f.Close()
		if interp {
			t.Skip("host busybox is dynamic")
		}
	}
	blobs := &memBlobs{blobs: map[digest.Digest][]byte{}}
	base := glibcBase(t, true)
	base.file("bin/busybox", bb)
	layer := base.convert(t, blobs)
	ld, libc, truebin := hostReal(t, "/lib64/ld-linux-x86-64.so.2"), hostReal(t, "/lib/x86_64-linux-gnu/libc.so.6"), hostReal(t, "/usr/bin/true")
	for _, tc := range []struct {
		argv []string
		want []string
	}{
		{[]string{"/bin/busybox", "sh"}, []string{"bin/busybox"}},
		{[]string{"/bin/busybox", "sh", "-c", "true; exec true"}, []string{"bin/busybox", truebin, ld, "etc/ld.so.cache", libc}},
	} {
		got, _ := predictNames(t, blobs, ocispec.ImageConfig{Entrypoint: tc.argv}, layer)
		if !slices.Equal(got, tc.want) {
			t.Errorf("%v: prediction %v, want %v", tc.argv, got, tc.want)
		}
	}
}

// TestPredictTree covers the merged view with scripts (no ELF needed):
// whiteouts, opaque directories, PATH order, symlinks and their bounds.
func TestPredictTree(t *testing.T) {
	for _, tc := range []struct {
		name   string
		cfg    ocispec.ImageConfig
		layers []func(l *layerBuilder)
		want   []string
	}{
		{name: "PATH order",
			cfg: ocispec.ImageConfig{Cmd: []string{"app"}, Env: []string{"PATH=/a:/b:/c"}},
			layers: []func(*layerBuilder){func(l *layerBuilder) {
				l.script("b/app", "#!/c/interp\n")
				l.script("c/app", "#!/c/interp\n")
				l.script("c/interp", "#!/c/sh\n")
				l.script("c/sh", "not a script\n")
			}},
			want: []string{"b/app", "c/interp", "c/sh"}},
		{name: "whiteout hides the lower file",
			cfg: ocispec.ImageConfig{Cmd: []string{"app"}, Env: []string{"PATH=/a:/b"}},
			layers: []func(*layerBuilder){
				func(l *layerBuilder) { l.script("a/app", "#!/x\n"); l.script("b/app", "#!/y\n") },
				func(l *layerBuilder) { l.script("a/.wh.app", "") },
			},
			want: []string{"b/app"}},
		{name: "whiteout of a directory hides what is under it",
			cfg: ocispec.ImageConfig{Cmd: []string{"app"}, Env: []string{"PATH=/a/bin:/b"}},
			layers: []func(*layerBuilder){
				func(l *layerBuilder) { l.script("a/bin/app", "#!/x\n"); l.script("b/app", "#!/y\n") },
				func(l *layerBuilder) { l.script(".wh.a", "") },
			},
			want: []string{"b/app"}},
		{name: "opaque directory hides the lower layer's entries, not its own",
			cfg: ocispec.ImageConfig{Cmd: []string{"app"}, Env: []string{"PATH=/a:/b"}},
			layers: []func(*layerBuilder){
				func(l *layerBuilder) {
					l.script("a/app", "#!/x\n")
					l.script("b/app", "#!/y\n")
					l.script("b/other", "#!/z\n")
				},
				func(l *layerBuilder) {
					l.script("a/.wh..wh..opq", "")
					l.script("b/.wh..wh..opq", "")
					l.script("b/app", "#!/b/other\n")
				},
			},
			want: []string{"b/app"}},
		{name: "a file over a lower directory hides it",
			cfg: ocispec.ImageConfig{Cmd: []string{"/a/app"}},
			layers: []func(*layerBuilder){
				func(l *layerBuilder) { l.script("a/app", "#!/x\n") },
				func(l *layerBuilder) { l.script("a", "#!/x\n") },
			},
			want: nil},
		{name: "symlinks: relative, absolute, through directories",
			cfg: ocispec.ImageConfig{Cmd: []string{"/bin/app"}},
			layers: []func(*layerBuilder){func(l *layerBuilder) {
				l.symlink("bin", "usr/bin")
				l.symlink("usr/bin/app", "../libexec/app")
				l.symlink("usr/libexec/app", "/opt/real/app")
				l.script("opt/real/app", "#!/bin/interp\n")
				l.symlink("usr/bin/interp", "./interp2")
				l.script("usr/bin/interp2", "plain\n")
			}},
			want: []string{"opt/real/app", "usr/bin/interp2"}},
		{name: "symlink loop is bounded",
			cfg: ocispec.ImageConfig{Cmd: []string{"a"}, Env: []string{"PATH=/bin:/ok"}},
			layers: []func(*layerBuilder){func(l *layerBuilder) {
				l.symlink("bin/a", "b")
				l.symlink("bin/b", "a")
				l.symlink("loop", "loop/loop")
				l.symlink("ok/a", "/loop/a")
			}},
			want: nil},
		{name: "links out of the root stay inside the tree",
			cfg: ocispec.ImageConfig{Cmd: []string{"/app/evil"}},
			layers: []func(*layerBuilder){func(l *layerBuilder) {
				l.symlink("app/evil", "../../../../../../etc/target")
				l.script("etc/target", "#!/../../../../etc/interp\n")
				l.symlink("etc/interp", "/../../../usr/../../etc/interp2")
				l.script("etc/interp2", "x\n")
			}},
			want: []string{"etc/target", "etc/interp2"}},
		{name: "shebang loop is bounded",
			cfg: ocispec.ImageConfig{Cmd: []string{"/a"}},
			layers: []func(*layerBuilder){func(l *layerBuilder) {
				l.script("a", "#!/b\n")
				l.script("b", "#!/a\n")
			}},
			want: []string{"a", "b"}},
		{name: "nothing to run",
			cfg:    ocispec.ImageConfig{},
			layers: []func(*layerBuilder){func(l *layerBuilder) { l.script("a", "#!/b\n") }},
			want:   nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			blobs := &memBlobs{blobs: map[digest.Digest][]byte{}}
			var layers []api.LayerTree
			for _, fill := range tc.layers {
				l := &layerBuilder{}
				fill(l)
				layers = append(layers, l.convert(t, blobs))
			}
			got, _ := predictNames(t, blobs, tc.cfg, layers...)
			if !slices.Equal(got, tc.want) {
				t.Errorf("prediction %v, want %v", got, tc.want)
			}
		})
	}
}

// TestPredictHostileBounds: entries that claim huge files and ELF headers
// that claim huge tables cost at most the limits.
func TestPredictHostileBounds(t *testing.T) {
	// An ELF header whose program headers are 1 GiB into a file that
	// claims 1 TiB, in one chunk whose gzip member inflates to 16 MiB of
	// zeros after the header.
	hdr := elf.Header64{Type: uint16(elf.ET_DYN), Machine: uint16(elf.EM_X86_64), Version: 1,
		Phoff: 1 << 30, Phentsize: 56, Phnum: 8, Ehsize: 64}
	copy(hdr.Ident[:], elf.ELFMAG)
	hdr.Ident[elf.EI_CLASS], hdr.Ident[elf.EI_DATA], hdr.Ident[elf.EI_VERSION] = byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), 1
	var raw bytes.Buffer
	binary.Write(&raw, binary.LittleEndian, &hdr)
	raw.Write(make([]byte, 16<<20))
	var member bytes.Buffer
	zw := gzip.NewWriter(&member)
	zw.Write(raw.Bytes())
	zw.Close()
	blob := append([]byte(nil), member.Bytes()...)
	d := digest.FromBytes(blob)
	blobs := &memBlobs{blobs: map[digest.Digest][]byte{d: blob}}
	content := digest.FromString("claimed").String()
	huge := func(name string) api.Entry {
		return api.Entry{Name: name, Type: api.TypeReg, Mode: 0o755, Size: 1 << 40, Digest: content,
			Chunks: []api.Chunk{{Offset: 0, Size: 1 << 40, Digest: content, CompressedOffset: 0, CompressedSize: int64(len(blob))}}}
	}
	var entries []api.Entry
	for i := range 300 {
		entries = append(entries, huge(fmt.Sprintf("bin/p%03d", i)))
	}
	layer := api.LayerTree{Digest: d.String(), Entries: entries}

	lim := Limits{Files: 16, FileBytes: 1 << 20, Bytes: 4 << 20, Depth: 4}
	res, err := Predict(context.Background(), blobs, Image{Config: ocispec.ImageConfig{Cmd: []string{"/bin/p000"}}, Layers: []api.LayerTree{layer}}, lim)
	if err != nil {
		t.Fatal(err)
	}
	if res.Bytes > lim.FileBytes*2 {
		t.Errorf("%d bytes decompressed, want at most %d per file", res.Bytes, lim.FileBytes)
	}
	if len(res.Accesses) != 1 || res.Accesses[0].Name != "bin/p000" {
		t.Errorf("accesses %+v, want the program alone", res.Accesses)
	}

	// A script naming every other file as its interpreter's argument and
	// chained interpreters: bounded by Depth and Files.
	var scripts []api.Entry
	sblobs := &memBlobs{blobs: map[digest.Digest][]byte{}}
	var sblob []byte
	for i := range 300 {
		body := fmt.Sprintf("#!/s/%03d x\n", i+1)
		var m bytes.Buffer
		zw := gzip.NewWriter(&m)
		zw.Write([]byte(body))
		zw.Close()
		cd := digest.FromString(body).String()
		scripts = append(scripts, api.Entry{Name: fmt.Sprintf("s/%03d", i), Type: api.TypeReg, Mode: 0o755,
			Size: int64(len(body)), Digest: cd,
			Chunks: []api.Chunk{{Size: int64(len(body)), Digest: cd, CompressedOffset: int64(len(sblob)), CompressedSize: int64(m.Len())}}})
		sblob = append(sblob, m.Bytes()...)
	}
	sd := digest.FromBytes(sblob)
	sblobs.blobs[sd] = sblob
	res, err = Predict(context.Background(), sblobs, Image{Config: ocispec.ImageConfig{Cmd: []string{"/s/000"}},
		Layers: []api.LayerTree{{Digest: sd.String(), Entries: scripts}}}, DefaultLimits)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(res.Accesses); n != DefaultLimits.Depth+1 {
		t.Errorf("%d accesses for a chain of interpreters, want %d (Depth+1)", n, DefaultLimits.Depth+1)
	}
	if res.Files > DefaultLimits.Files || sblobs.opens.Load() > int64(DefaultLimits.Files) {
		t.Errorf("%d files read, %d blob opens", res.Files, sblobs.opens.Load())
	}
}

// TestPredictContext: a cancelled context stops the prediction with its
// error.
func TestPredictContext(t *testing.T) {
	blobs := &memBlobs{blobs: map[digest.Digest][]byte{}}
	l := &layerBuilder{}
	l.script("a", "#!/b\n")
	layer := l.convert(t, blobs)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Predict(ctx, blobs, Image{Config: ocispec.ImageConfig{Cmd: []string{"/a"}}, Layers: []api.LayerTree{layer}}, DefaultLimits); err == nil {
		t.Error("no error from a cancelled prediction")
	}
}

func TestShellCommand(t *testing.T) {
	for _, tc := range []struct {
		argv []string
		want []string
	}{
		{[]string{"/bin/sh", "-c", "exec python3 -m app"}, []string{"python3", "-m", "app"}},
		{[]string{"sh", "-ec", "cd /app && FOO=bar ./start --x=1"}, []string{"./start", "--x=1"}},
		{[]string{"bash", "-o", "pipefail", "-c", "set -x; node server.js | tee log"}, []string{"node", "server.js"}},
		{[]string{"sh", "-c", "$APP"}, nil},
		{[]string{"sh", "-c", `"quoted" x`}, nil},
		{[]string{"sh", "-c", "true && exec true -x"}, []string{"true", "-x"}},
		{[]string{"sh", "script.sh"}, nil},
		{[]string{"sh"}, nil},
		{[]string{"/usr/bin/env", "-i", "A=b", "python3", "x.py"}, []string{"python3", "x.py"}},
		{[]string{"env", "-S python3 -u", "/app/x.py"}, []string{"python3", "-u", "/app/x.py"}},
		{[]string{"busybox", "sh", "-c", "httpd -f"}, []string{"httpd", "-f"}},
		{[]string{"/usr/bin/python3", "-c", "print(1)"}, nil},
	} {
		if got := chained(tc.argv, tc.argv[0]); !slices.Equal(got, tc.want) {
			t.Errorf("%q: %q, want %q", tc.argv, got, tc.want)
		}
	}
}

func TestLDCache(t *testing.T) {
	b, err := os.ReadFile("/etc/ld.so.cache")
	if err != nil {
		t.Skip("no ld.so.cache on the host")
	}
	c, err := parseLDCache(b)
	if err != nil {
		t.Fatal(err)
	}
	if runtime.GOARCH == "amd64" {
		if p := c.lookup("libc.so.6", elf.EM_X86_64, elf.ELFCLASS64); p == "" {
			t.Error("libc.so.6 not in the host's cache")
		}
		if p := c.lookup("libc.so.6", elf.EM_AARCH64, elf.ELFCLASS64); p != "" {
			t.Errorf("aarch64 libc.so.6 at %s in an amd64 cache", p)
		}
	}
	for _, bad := range [][]byte{nil, []byte(cacheMagicNew), append([]byte(cacheMagicNew), make([]byte, 40)...)} {
		if c, err := parseLDCache(bad); err == nil && len(c) > 0 {
			t.Errorf("parsed %d entries from %q", len(c), bad)
		}
	}
	// Entries pointing past the end, a huge count: refused or skipped.
	h := append([]byte(cacheMagicNew), make([]byte, 28)...)
	binary.LittleEndian.PutUint32(h[20:], 1<<30)
	if _, err := parseLDCache(h); err == nil {
		t.Error("a cache claiming 2^30 entries parsed")
	}
}
