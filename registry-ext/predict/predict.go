// Package predict predicts, at conversion time, the files a container of
// an image reads first when it starts, for images nobody has run yet.
//
// From the image config (entrypoint and cmd, PATH, LD_LIBRARY_PATH, the
// working directory) and the converted layers' file trees, it follows what
// the kernel and the dynamic loader do at exec, in the merged view of the
// layers (upper layers win, whiteouts and opaque directories hide lower
// entries, symlinks resolve inside the image root):
//
//  1. argv[0] (Entrypoint[0], else Cmd[0]), searched through PATH when it
//     has no '/';
//  2. a script's "#!" interpreter, recursively, with the script before it
//     (the kernel reads the script's first line, then the interpreter);
//  3. an ELF program's PT_INTERP (the dynamic loader), then what the
//     loader opens: /etc/ld.so.preload and its libraries, /etc/ld.so.cache
//     at the first library lookup that reaches it, the DT_NEEDED closure
//     breadth first in DT_NEEDED order, each library searched as glibc's
//     (or musl's) loader does: DT_RPATH, LD_LIBRARY_PATH, DT_RUNPATH
//     ($ORIGIN expanded), the cache, the default directories of the ELF
//     machine;
//  4. the program a shell is asked to run ("sh -c 'exec app …'": the
//     script's first command) and the program env(1) runs, the same way.
//
// The result is the list of those files in that order, as the accesses of
// an api.TraceReport (Report) that the registry ingests like a worker's
// report, marked as predicted: it orders the bundle of an image until a
// real trace of it exists, and changes no content.
//
// Contents are read from the converted layer blobs, a chunk's gzip member
// decompressed only as far as needed: an ELF file's headers, program
// headers, PT_INTERP, dynamic section and the strings it names; a
// script's first line. Every read is bounded (Limits), and so is the
// whole prediction.
package predict

import (
	"bytes"
	"context"
	"debug/elf"
	"io"
	"path"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
)

// Worker is the Worker of a predicted api.TraceReport.
const Worker = "starlight-registry/predict"

// DefaultPath is the PATH of a config that sets none (containerd's and
// Docker's default).
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// BlobOpener opens the converted layer blobs of an image. The registry's
// blob store and delta.BlobOpener have this method.
type BlobOpener interface {
	OpenBlob(ctx context.Context, repository string, dgst digest.Digest) (io.ReadSeekCloser, error)
}

// Image is what a prediction reads.
type Image struct {
	Repository string // passed to the BlobOpener
	Config     ocispec.ImageConfig
	// Layers are the converted layers, base first: their digests (the
	// blobs read) and their entries with chunk locations, as indexed.
	Layers []api.LayerTree
}

// Limits bound a prediction. A prediction that reaches one stops there
// and keeps what it found.
type Limits struct {
	Files     int   // files read (each program, interpreter, library candidate, loader file)
	FileBytes int64 // bytes decompressed per file
	Bytes     int64 // bytes decompressed in all
	Depth     int   // programs chained: shebang interpreters, "sh -c", env
}

// DefaultLimits are the limits the registry predicts with.
var DefaultLimits = Limits{Files: 256, FileBytes: 4 << 20, Bytes: 64 << 20, Depth: 4}

// Result is a prediction.
type Result struct {
	// Accesses are the files predicted, first read first, each named by
	// its entry in the layer that holds it, at chunk offset 0 (whole
	// files), with strictly increasing synthetic times (1 µs apart).
	Accesses []api.TraceAccess
	Files    int   // files read
	Bytes    int64 // bytes decompressed
}

// Predict predicts the first files a container of im reads. The error is
// the context's, or a failure to read a layer blob; the Result holds what
// was predicted before it.
func Predict(ctx context.Context, blobs BlobOpener, im Image, lim Limits) (*Result, error) {
	p := &predictor{
		ctx: ctx, blobs: blobs, repository: im.Repository, lim: lim,
		tree:    newTree(im.Layers),
		workdir: "/",
		listed:  map[*api.Entry]bool{},
		elfs:    map[*api.Entry]*elfInfo{},
	}
	if wd := im.Config.WorkingDir; wd != "" {
		p.workdir = path.Clean("/" + wd)
	}
	p.path = DefaultPath
	for _, kv := range im.Config.Env {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "PATH":
			p.path = v
		case "LD_LIBRARY_PATH":
			p.libraryPath = v
		}
	}
	argv := im.Config.Cmd
	if len(im.Config.Entrypoint) > 0 {
		argv = append(append([]string(nil), im.Config.Entrypoint...), im.Config.Cmd...)
	}
	p.exec(argv, 0, true)
	res := &Result{Accesses: p.out, Files: p.files, Bytes: p.used}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	return res, p.blobErr
}

// Report is the trace report of a prediction of the converted platform
// manifest manifestDigest of repository.
func Report(repository, manifestDigest string, res *Result) *api.TraceReport {
	return &api.TraceReport{Repository: repository, ManifestDigest: manifestDigest, Worker: Worker,
		StartedAt: time.Unix(0, 0).UTC(), Accesses: res.Accesses}
}

type predictor struct {
	ctx        context.Context
	blobs      BlobOpener
	repository string
	lim        Limits
	tree       *tree

	workdir     string
	path        string // PATH
	libraryPath string // LD_LIBRARY_PATH

	out     []api.TraceAccess
	listed  map[*api.Entry]bool     // contents already predicted
	elfs    map[*api.Entry]*elfInfo // parsed ELF files (nil: not ELF)
	files   int
	used    int64
	blobErr error

	cacheRead bool    // /etc/ld.so.cache was looked for
	cache     ldCache // nil when absent or unreadable
	muslPaths map[string][]string
}

// stopped reports whether the prediction must end: the context is done,
// a limit is reached or a blob could not be read.
func (p *predictor) stopped() bool {
	return p.ctx.Err() != nil || p.files >= p.lim.Files || p.used >= p.lim.Bytes || p.blobErr != nil
}

// list appends f to the prediction, once per content.
func (p *predictor) list(f *file) {
	if f.content.Digest == "" || p.listed[f.content] || len(p.out) >= p.lim.Files {
		return // nothing travels for an empty file
	}
	p.listed[f.content] = true
	p.out = append(p.out, api.TraceAccess{Layer: p.tree.layers[f.layer].Digest, Name: f.content.Name,
		Digest: f.content.Digest, TimeNS: int64(len(p.out)) * int64(time.Microsecond)})
}

// abs makes p absolute against the working directory.
func (p *predictor) abs(name string) string {
	if strings.HasPrefix(name, "/") {
		return name
	}
	return path.Join(p.workdir, name)
}

// open resolves name (relative to the working directory) to a regular file.
func (p *predictor) open(name string) *file {
	f, err := p.tree.open(p.abs(name))
	if err != nil {
		return nil
	}
	return f
}

// lookPath finds a program as execvp does: a name with a '/' as is,
// another in every PATH directory in turn, the first executable regular
// file.
func (p *predictor) lookPath(name string) *file {
	if name == "" {
		return nil
	}
	if strings.Contains(name, "/") {
		return p.open(name)
	}
	for _, dir := range strings.Split(p.path, ":") {
		if dir == "" {
			dir = "."
		}
		if f := p.open(path.Join(dir, name)); f != nil && f.content.Mode&0o111 != 0 {
			return f
		}
	}
	return nil
}

// head reads the first n bytes of f.
func (p *predictor) head(f *file, n int) []byte {
	if p.stopped() {
		return nil
	}
	p.files++
	r := p.reader(f)
	defer r.close()
	b, _ := r.readAt(0, n)
	return b
}

// elfOf parses f as an ELF file, once per content; nil if it is not one.
func (p *predictor) elfOf(f *file) *elfInfo {
	if info, ok := p.elfs[f.content]; ok {
		return info
	}
	if p.stopped() {
		return nil
	}
	p.files++
	r := p.reader(f)
	info, err := readELF(r)
	r.close()
	if err != nil {
		info = nil
	}
	p.elfs[f.content] = info
	return info
}

// binprmBuf is how much of a script the kernel reads for its "#!" line
// (BINPRM_BUF_SIZE).
const binprmBuf = 256

// exec predicts an execve of argv[0] (searched through PATH when search)
// with arguments argv[1:].
func (p *predictor) exec(argv []string, depth int, search bool) {
	if len(argv) == 0 || depth > p.lim.Depth || p.stopped() {
		return
	}
	var f *file
	if search {
		f = p.lookPath(argv[0])
	} else {
		f = p.open(argv[0])
	}
	if f == nil {
		return
	}
	p.list(f) // the kernel reads the program first, whatever it is
	if info, ok := p.elfs[f.content]; ok && info != nil {
		p.execELF(f, info, argv, depth)
		return
	}
	head := p.head(f, binprmBuf)
	switch {
	case bytes.HasPrefix(head, []byte("#!")):
		interp, arg := shebang(head)
		if interp == "" {
			return
		}
		next := []string{interp}
		if arg != "" {
			next = append(next, arg)
		}
		next = append(next, "/"+f.name)
		next = append(next, argv[1:]...)
		p.exec(next, depth+1, false)
	case isELF(head):
		if info := p.elfOf(f); info != nil {
			p.execELF(f, info, argv, depth)
		}
	}
}

// shebang parses a "#!interp [arg]" line as Linux does: one optional
// argument, the rest of the line.
func shebang(head []byte) (interp, arg string) {
	line := head[2:]
	if i := bytes.IndexByte(line, '\n'); i >= 0 {
		line = line[:i]
	}
	s := strings.Trim(string(line), " \t\r")
	interp, arg, _ = strings.Cut(strings.ReplaceAll(s, "\t", " "), " ")
	return interp, strings.TrimSpace(arg)
}

// execELF predicts what the kernel and the loader read after the program
// f: its interpreter and libraries; then the program it runs, if it is a
// shell with -c or env.
func (p *predictor) execELF(f *file, info *elfInfo, argv []string, depth int) {
	if info.interp != "" {
		if ld := p.open(info.interp); ld != nil {
			p.list(ld)
			p.link(f, info, ld)
		}
	}
	if next := chained(argv, f.name); next != nil {
		p.exec(next, depth+1, true)
	}
}

// object is an ELF object of the process being linked.
type object struct {
	path   string // as opened; its directory is $ORIGIN
	info   *elfInfo
	loader *object // the object that needed it; nil for the program
}

// link predicts the loader's work for program f: preloads, then the
// DT_NEEDED closure, breadth first.
func (p *predictor) link(f *file, info *elfInfo, ld *file) {
	musl := strings.HasPrefix(path.Base(info.interp), "ld-musl-")
	main := &object{path: "/" + f.name, info: info}
	names := map[string]bool{path.Base(info.interp): true}
	if ldInfo := p.elfOf(ld); ldInfo != nil && ldInfo.soname != "" {
		names[ldInfo.soname] = true
	}
	mapped := map[*api.Entry]bool{ld.content: true, f.content: true}
	queue := []*object{main}
	add := func(lf *file, o *object) {
		if mapped[lf.content] {
			return
		}
		mapped[lf.content] = true
		if o.info.soname != "" {
			names[o.info.soname] = true
		}
		p.list(lf)
		queue = append(queue, o)
	}
	if !musl {
		if pf := p.open("/etc/ld.so.preload"); pf != nil {
			p.list(pf)
			for _, name := range strings.FieldsFunc(string(p.head(pf, 64<<10)), func(r rune) bool {
				return r == ' ' || r == '\t' || r == '\n' || r == ':'
			}) {
				if lf, o := p.findLib(name, main, musl); lf != nil {
					add(lf, o)
				}
			}
		}
	}
	for i := 0; i < len(queue) && !p.stopped(); i++ {
		obj := queue[i]
		for _, name := range obj.info.needed {
			if names[name] {
				continue
			}
			names[name] = true
			if lf, o := p.findLib(name, obj, musl); lf != nil {
				add(lf, o)
			}
			if p.stopped() {
				return
			}
		}
	}
}

// findLib searches library name needed by loader as the dynamic loader
// does, and returns the first candidate that is an ELF file of the
// program's class and machine.
func (p *predictor) findLib(name string, loader *object, musl bool) (*file, *object) {
	main := loader
	for main.loader != nil {
		main = main.loader
	}
	try := func(candidate string) (*file, *object) {
		if p.stopped() {
			return nil, nil
		}
		f := p.open(candidate)
		if f == nil {
			return nil, nil
		}
		info := p.elfOf(f)
		if info == nil || !info.compatible(main.info) {
			return nil, nil
		}
		return f, &object{path: p.abs(candidate), info: info, loader: loader}
	}
	if strings.Contains(name, "/") {
		return try(expandOrigin(name, loader))
	}
	var dirs []string
	addDirs := func(list string, o *object) {
		for _, d := range strings.Split(list, ":") {
			if d != "" {
				dirs = append(dirs, expandOrigin(d, o))
			}
		}
	}
	if musl {
		addDirs(p.libraryPath, nil)
		for o := loader; o != nil; o = o.loader {
			if o.info.runpath != "" {
				addDirs(o.info.runpath, o)
			} else {
				addDirs(o.info.rpath, o)
			}
		}
	} else {
		if loader.info.runpath == "" {
			for o := loader; o != nil; o = o.loader {
				addDirs(o.info.rpath, o)
			}
		}
		addDirs(p.libraryPath, nil)
		addDirs(loader.info.runpath, loader)
	}
	for _, d := range dirs {
		if strings.Contains(d, "$") {
			continue // $LIB, $PLATFORM: not predicted
		}
		if f, o := try(path.Join(d, name)); f != nil {
			return f, o
		}
	}
	if musl {
		for _, d := range p.muslPath(main.info) {
			if f, o := try(path.Join(d, name)); f != nil {
				return f, o
			}
		}
		return nil, nil
	}
	if c := p.ldCache(); c != nil {
		if cp := c.lookup(name, main.info.machine, main.info.class); cp != "" {
			if f, o := try(cp); f != nil {
				return f, o
			}
		}
	}
	if loader.info.nodef {
		return nil, nil
	}
	for _, d := range defaultDirs(main.info) {
		if f, o := try(path.Join(d, name)); f != nil {
			return f, o
		}
	}
	return nil, nil
}

// expandOrigin expands $ORIGIN (and ${ORIGIN}) to the directory of o.
func expandOrigin(s string, o *object) string {
	if o == nil || !strings.Contains(s, "ORIGIN") {
		return s
	}
	dir := path.Dir(o.path)
	s = strings.ReplaceAll(s, "${ORIGIN}", dir)
	return strings.ReplaceAll(s, "$ORIGIN", dir)
}

// ldCache reads /etc/ld.so.cache the first time a lookup reaches it, as
// glibc's loader does, and lists it.
func (p *predictor) ldCache() ldCache {
	if p.cacheRead {
		return p.cache
	}
	p.cacheRead = true
	f := p.open("/etc/ld.so.cache")
	if f == nil {
		return nil
	}
	p.list(f)
	if p.stopped() || f.content.Size > p.lim.FileBytes {
		return nil
	}
	p.files++
	r := p.reader(f)
	defer r.close()
	b, err := r.readAt(0, int(f.content.Size))
	if err != nil {
		return nil
	}
	p.cache, _ = parseLDCache(b)
	return p.cache
}

// muslPath is musl's system search path: /etc/ld-musl-ARCH.path, listed
// when present, else /lib:/usr/local/lib:/usr/lib.
func (p *predictor) muslPath(info *elfInfo) []string {
	arch := muslArch(info)
	if dirs, ok := p.muslPaths[arch]; ok {
		return dirs
	}
	dirs := []string{"/lib", "/usr/local/lib", "/usr/lib"}
	if f := p.open("/etc/ld-musl-" + arch + ".path"); f != nil {
		p.list(f)
		dirs = strings.FieldsFunc(string(p.head(f, 64<<10)), func(r rune) bool { return r == '\n' || r == ':' })
	}
	if p.muslPaths == nil {
		p.muslPaths = map[string][]string{}
	}
	p.muslPaths[arch] = dirs
	return dirs
}

func muslArch(info *elfInfo) string {
	switch info.machine {
	case elf.EM_X86_64:
		return "x86_64"
	case elf.EM_AARCH64:
		return "aarch64"
	case elf.EM_386:
		return "i386"
	case elf.EM_ARM:
		return "armhf"
	case elf.EM_PPC64:
		return "powerpc64le"
	case elf.EM_S390:
		return "s390x"
	case elf.EM_RISCV:
		return "riscv64"
	}
	return strings.ToLower(strings.TrimPrefix(info.machine.String(), "EM_"))
}

// multiarch is Debian's multiarch tuple of an ELF machine, "" if unknown.
func multiarch(info *elfInfo) string {
	is64 := info.class == elf.ELFCLASS64
	switch info.machine {
	case elf.EM_X86_64:
		if is64 {
			return "x86_64-linux-gnu"
		}
		return "x86_64-linux-gnux32"
	case elf.EM_AARCH64:
		return "aarch64-linux-gnu"
	case elf.EM_386:
		return "i386-linux-gnu"
	case elf.EM_ARM:
		return "arm-linux-gnueabihf"
	case elf.EM_PPC64:
		return "powerpc64le-linux-gnu"
	case elf.EM_S390:
		return "s390x-linux-gnu"
	case elf.EM_RISCV:
		return "riscv64-linux-gnu"
	}
	return ""
}

// defaultDirs are the loader's built-in directories for a machine: the
// multiarch ones, then lib64 (64-bit), then lib.
func defaultDirs(info *elfInfo) []string {
	var dirs []string
	if t := multiarch(info); t != "" {
		dirs = append(dirs, "/lib/"+t, "/usr/lib/"+t)
	}
	if info.class == elf.ELFCLASS64 {
		dirs = append(dirs, "/lib64", "/usr/lib64")
	}
	return append(dirs, "/lib", "/usr/lib")
}

// chained returns the program a shell given -c, or env, runs next; nil
// if argv runs none. resolved is the path argv[0] resolved to.
func chained(argv []string, resolved string) []string {
	if len(argv) == 0 {
		return nil
	}
	name := path.Base(argv[0])
	if name == "busybox" && len(argv) > 1 {
		argv, name = argv[1:], path.Base(argv[1])
	}
	if !isShell(name) && name != "env" {
		name = path.Base(resolved) // e.g. /bin/sh → dash
	}
	switch {
	case name == "env":
		return envCommand(argv[1:])
	case isShell(name):
		for i := 1; i < len(argv); i++ {
			a := argv[i]
			switch {
			case a == "-o" || a == "+o" || a == "-O" || a == "+O":
				i++ // takes an option name
			case a == "--" || len(a) < 2 || a[0] != '-' && a[0] != '+':
				return nil // a script file: not predicted
			case strings.HasPrefix(a, "--") || a[0] == '+':
			case strings.ContainsRune(a[1:], 'c'):
				if i+1 < len(argv) {
					return firstCommand(argv[i+1])
				}
				return nil
			}
		}
	}
	return nil
}

func isShell(name string) bool {
	switch name {
	case "sh", "bash", "dash", "ash", "zsh", "ksh", "mksh":
		return true
	}
	return false
}

// envCommand returns the command env(1) runs given args: after its
// options and NAME=VALUE assignments; -S splits its argument.
func envCommand(args []string) []string {
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			return args[i+1:]
		case a == "-u" || a == "--unset" || a == "-C" || a == "--chdir":
			i++
		case strings.HasPrefix(a, "-S") || strings.HasPrefix(a, "--split-string"):
			s := strings.TrimPrefix(strings.TrimPrefix(a, "--split-string"), "-S")
			s = strings.TrimPrefix(s, "=")
			if s == "" && i+1 < len(args) {
				i++
				s = args[i]
			}
			return envCommand(append(strings.Fields(s), args[i+1:]...))
		case strings.HasPrefix(a, "-"):
		case strings.Contains(a, "="):
		default:
			return args[i:]
		}
	}
	return nil
}

// shellBuiltins are commands a shell runs itself: the first one that is
// not is the program a "-c" script starts.
var shellBuiltins = map[string]bool{
	"set": true, "cd": true, "export": true, "unset": true, "echo": true, "printf": true,
	":": true, "[": true, "test": true, "true": true, "false": true, "trap": true,
	"ulimit": true, "umask": true, "source": true, ".": true, "eval": true, "shift": true,
	"read": true, "wait": true, "local": true, "readonly": true, "alias": true, "type": true,
	"if": true, "then": true, "else": true, "fi": true, "do": true, "done": true, "!": true,
}

// firstCommand returns the words of the first simple command of a shell
// script that is a program, skipping assignments, exec and builtins
// (unless exec'd); nil
// when that word is not a plain name (an expansion, a quote, a function).
func firstCommand(script string) []string {
	cmds := strings.FieldsFunc(script, func(r rune) bool {
		return r == ';' || r == '&' || r == '|' || r == '\n' || r == '(' || r == ')' || r == '{' || r == '}'
	})
	for i, c := range cmds {
		if i >= 8 {
			break
		}
		words := strings.Fields(c)
		execs := false // exec and command run the program, not a builtin of its name
		for len(words) > 0 && (words[0] == "exec" || words[0] == "command" || words[0] == "nohup" ||
			(strings.Contains(words[0], "=") && !strings.HasPrefix(words[0], "="))) {
			execs = execs || words[0] == "exec" || words[0] == "command"
			words = words[1:]
		}
		if len(words) == 0 || shellBuiltins[words[0]] && !execs {
			continue
		}
		for j, w := range words {
			if !plainWord(w) {
				words = words[:j]
				break
			}
		}
		if len(words) == 0 {
			return nil
		}
		return words
	}
	return nil
}

func plainWord(w string) bool {
	for _, r := range w {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("/._+-@%,=:", r)) {
			return false
		}
	}
	return w != ""
}
