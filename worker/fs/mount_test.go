package fs

import (
	"bytes"
	"compress/gzip"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
	"github.com/starlight-project/starlight/worker/store"
)

func requireFUSE(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIPPING: FUSE mount tests need root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("SKIPPING: FUSE mount tests need /dev/fuse: %v", err)
	}
}

var mtime = time.Unix(1700000000, 123456789)

// content is a file content as the registry would send it, in chunks.
type content struct {
	data   []byte
	d      digest.Digest
	chunks []api.Chunk
	frames []api.Frame
	raw    [][]byte
}

func newContent(t testing.TB, data []byte, chunkSize int) *content {
	t.Helper()
	c := &content{data: data, d: digest.FromBytes(data)}
	for off := 0; off < len(data); off += chunkSize {
		p := data[off:min(off+chunkSize, len(data))]
		var buf bytes.Buffer
		w, _ := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
		w.Write(p)
		w.Close()
		ch := api.Chunk{Offset: int64(off), Size: int64(len(p)), Digest: digest.FromBytes(p).String()}
		c.chunks = append(c.chunks, ch)
		c.raw = append(c.raw, buf.Bytes())
		c.frames = append(c.frames, api.Frame{Digest: c.d.String(), Offset: ch.Offset, Size: ch.Size,
			ChunkDigest: ch.Digest, CompressedSize: int64(buf.Len())})
	}
	return c
}

func randomContent(t testing.TB, seed int64, size, chunkSize int) *content {
	data := make([]byte, size)
	rand.New(rand.NewSource(seed)).Read(data)
	return newContent(t, data, chunkSize)
}

func (c *content) entry(name string, mode uint32) api.Entry {
	return api.Entry{Name: name, Type: api.TypeReg, Mode: mode, Size: int64(len(c.data)),
		Digest: c.d.String(), Chunks: c.chunks, ModTime: mtime}
}

func (c *content) expect(t testing.TB, s *store.Store) {
	t.Helper()
	if err := s.Expect(c.d, int64(len(c.data)), c.chunks); err != nil {
		t.Fatal(err)
	}
}

func (c *content) write(t testing.TB, s *store.Store, i int) {
	t.Helper()
	data, err := bundle.Decode(c.frames[i], bytes.NewReader(c.raw[i]))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.WriteChunk(c.frames[i], data); err != nil {
		t.Fatal(err)
	}
}

func (c *content) put(t testing.TB, s *store.Store) {
	t.Helper()
	c.expect(t, s)
	for i := range c.frames {
		c.write(t, s, i)
	}
}

var layerSeq int

func mountLayer(t testing.TB, s *store.Store, entries []api.Entry, opts ...func(*Options)) string {
	t.Helper()
	mnt := t.TempDir()
	layerSeq++
	o := Options{Store: s, Debug: os.Getenv("FSDEBUG") != ""} // FSDEBUG=1 logs every request
	for _, f := range opts {
		f(&o)
	}
	m, err := Mount(mnt, api.LayerTree{Digest: digest.FromString(string(rune(layerSeq))).String(), Entries: entries}, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
	})
	return mnt
}

func openStore(t testing.TB) *store.Store {
	t.Helper()
	s, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestMountEntries(t *testing.T) {
	requireFUSE(t)
	s := openStore(t)
	passwd := newContent(t, []byte("root:x:0:0:root:/root:/bin/sh\n"), 1<<20)
	ping := randomContent(t, 1, 100_000, 40_000)
	passwd.put(t, s)
	ping.put(t, s)

	pingEntry := ping.entry("bin/ping", 0o4755)
	pingEntry.Xattrs = map[string][]byte{"security.capability": {1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}}
	passwdEntry := passwd.entry("etc/passwd", 0o644)
	passwdEntry.Xattrs = map[string][]byte{"user.origin": []byte("test"), "trusted.overlay.redirect": []byte("/x")}
	entries := []api.Entry{
		{Name: "etc", Type: api.TypeDir, Mode: 0o755, ModTime: mtime},
		passwdEntry,
		pingEntry, // "bin" is implicit
		{Name: "tmp", Type: api.TypeDir, Mode: 0o1777, ModTime: mtime},
		{Name: "shared", Type: api.TypeDir, Mode: 0o2775, GID: 50, ModTime: mtime},
		{Name: "empty", Type: api.TypeReg, Mode: 0o600, UID: 1000, GID: 1000, ModTime: mtime},
		{Name: "secret", Type: api.TypeReg, Mode: 0, ModTime: mtime},
		{Name: "link", Type: api.TypeSymlink, Mode: 0o777, LinkName: "etc/passwd", ModTime: mtime},
		// A hard link's header applies to its inode (containerd's applier).
		{Name: "hard", Type: api.TypeHardlink, LinkName: "etc/passwd", Mode: 0o644, ModTime: mtime},
		{Name: "dev/null", Type: api.TypeChar, Mode: 0o666, DevMajor: 1, DevMinor: 3, ModTime: mtime},
		{Name: "dev/sda", Type: api.TypeBlock, Mode: 0o660, GID: 6, DevMajor: 8, DevMinor: 0, ModTime: mtime},
		{Name: "fifo", Type: api.TypeFifo, Mode: 0o644, ModTime: mtime},
		{Name: "gone/.wh.old", Type: api.TypeReg, UID: 7, GID: 8, ModTime: mtime},
		{Name: "opq", Type: api.TypeDir, Mode: 0o700, ModTime: mtime},
		{Name: "opq/.wh..wh..opq", Type: api.TypeReg, ModTime: mtime},
		{Name: "replaced", Type: api.TypeReg, Mode: 0o644, ModTime: mtime},
		{Name: "replaced", Type: api.TypeSymlink, LinkName: "/nowhere", ModTime: mtime},
		{Name: "stargz.index.json", Type: api.TypeReg, ModTime: mtime},
		{Name: ".prefetch.landmark", Type: api.TypeReg, ModTime: mtime},
		{Name: ".no.prefetch.landmark", Type: api.TypeReg, ModTime: mtime},
	}
	var opened []string
	var mu sync.Mutex
	mnt := mountLayer(t, s, entries, func(o *Options) {
		o.OnOpen = func(_ digest.Digest, name string) {
			mu.Lock()
			opened = append(opened, name)
			mu.Unlock()
		}
	})

	type want struct {
		mode     uint32 // type and permission bits
		uid, gid uint32
		size     int64
		nlink    uint64
		rdev     uint64
	}
	wants := map[string]want{
		"":           {mode: syscall.S_IFDIR | 0o755, nlink: 2 + 7},
		"etc":        {mode: syscall.S_IFDIR | 0o755, size: 4096, nlink: 2},
		"etc/passwd": {mode: syscall.S_IFREG | 0o644, size: int64(len(passwd.data)), nlink: 2},
		"hard":       {mode: syscall.S_IFREG | 0o644, size: int64(len(passwd.data)), nlink: 2},
		"bin":        {mode: syscall.S_IFDIR | 0o755, nlink: 2},
		"bin/ping":   {mode: syscall.S_IFREG | syscall.S_ISUID | 0o755, size: 100_000, nlink: 1},
		"tmp":        {mode: syscall.S_IFDIR | syscall.S_ISVTX | 0o777, size: 4096, nlink: 2},
		"shared":     {mode: syscall.S_IFDIR | syscall.S_ISGID | 0o775, gid: 50, size: 4096, nlink: 2},
		"empty":      {mode: syscall.S_IFREG | 0o600, uid: 1000, gid: 1000, nlink: 1},
		"secret":     {mode: syscall.S_IFREG, nlink: 1},
		"link":       {mode: syscall.S_IFLNK | 0o777, size: int64(len("etc/passwd")), nlink: 1},
		"dev/null":   {mode: syscall.S_IFCHR | 0o666, nlink: 1, rdev: unix.Mkdev(1, 3)},
		"dev/sda":    {mode: syscall.S_IFBLK | 0o660, gid: 6, nlink: 1, rdev: unix.Mkdev(8, 0)},
		"fifo":       {mode: syscall.S_IFIFO | 0o644, nlink: 1},
		"gone/old":   {mode: syscall.S_IFCHR, uid: 7, gid: 8, nlink: 1, rdev: 0},
		"opq":        {mode: syscall.S_IFDIR | 0o700, size: 4096, nlink: 2},
		"replaced":   {mode: syscall.S_IFLNK | 0o777, size: int64(len("/nowhere")), nlink: 1},
	}
	for name, w := range wants {
		fi, err := os.Lstat(filepath.Join(mnt, name))
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		st := fi.Sys().(*syscall.Stat_t)
		got := want{mode: st.Mode, uid: st.Uid, gid: st.Gid, size: st.Size, nlink: st.Nlink, rdev: st.Rdev}
		if w.mode&syscall.S_IFMT == syscall.S_IFDIR && name != "etc" && name != "tmp" && name != "shared" && name != "opq" {
			got.size = w.size // implicit dirs and the root: size not specified
		}
		if got != w {
			t.Errorf("%s: got %+v, want %+v", name, got, w)
		}
		if name != "" && name != "bin" && name != "dev" && name != "gone" && name != "hard" &&
			(st.Mtim.Sec != mtime.Unix() || st.Mtim.Nsec != int64(mtime.Nanosecond()) || st.Atim != st.Mtim || st.Ctim != st.Mtim) {
			t.Errorf("%s: times %v %v %v, want %v", name, st.Atim, st.Mtim, st.Ctim, mtime)
		}
	}

	// Listing: hidden entries are not there, whiteouts are.
	names := func(dir string) string {
		des, err := os.ReadDir(filepath.Join(mnt, dir))
		if err != nil {
			t.Fatal(err)
		}
		var ns []string
		for _, de := range des {
			ns = append(ns, de.Name())
		}
		sort.Strings(ns)
		return strings.Join(ns, " ")
	}
	if got := names(""); got != "bin dev empty etc fifo gone hard link opq replaced secret shared tmp" {
		t.Errorf("root lists %q", got)
	}
	if got := names("opq"); got != "" {
		t.Errorf("opq lists %q", got)
	}
	for _, hidden := range []string{"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"} {
		if _, err := os.Lstat(filepath.Join(mnt, hidden)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: %v, want not found", hidden, err)
		}
	}

	// Hard links share the inode.
	a, _ := os.Lstat(filepath.Join(mnt, "etc/passwd"))
	b, _ := os.Lstat(filepath.Join(mnt, "hard"))
	if !os.SameFile(a, b) {
		t.Error("hard link is another inode")
	}
	if target, err := os.Readlink(filepath.Join(mnt, "link")); err != nil || target != "etc/passwd" {
		t.Errorf("readlink: %q, %v", target, err)
	}

	// Xattrs.
	xattrs := map[string]map[string]string{
		"bin/ping":   {"security.capability": string(pingEntry.Xattrs["security.capability"])},
		"etc/passwd": {"user.origin": "test"}, // the layer's trusted.overlay.* is dropped
		"opq":        {"trusted.overlay.opaque": "y"},
		"etc":        {},
		"gone/old":   {},
	}
	for name, w := range xattrs {
		p := filepath.Join(mnt, name)
		got := map[string]string{}
		for _, k := range listXattrs(t, p) {
			buf := make([]byte, 256)
			n, err := unix.Lgetxattr(p, k, buf)
			if err != nil {
				t.Errorf("%s: getxattr %s: %v", name, k, err)
			}
			got[k] = string(buf[:n])
		}
		if len(got) != len(w) {
			t.Errorf("%s: xattrs %q, want %q", name, got, w)
		}
		for k, v := range w {
			if got[k] != v {
				t.Errorf("%s: xattr %s = %q, want %q", name, k, got[k], v)
			}
		}
		if _, err := unix.Lgetxattr(p, "user.missing", nil); !errors.Is(err, unix.ENODATA) {
			t.Errorf("%s: missing xattr: %v", name, err)
		}
	}

	// Contents.
	for name, w := range map[string][]byte{"etc/passwd": passwd.data, "hard": passwd.data, "bin/ping": ping.data, "empty": nil, "link": passwd.data} {
		got, err := os.ReadFile(filepath.Join(mnt, name))
		if err != nil || !bytes.Equal(got, w) {
			t.Errorf("%s: content differs (%d bytes, %v)", name, len(got), err)
		}
	}
	if _, err := os.OpenFile(filepath.Join(mnt, "etc/passwd"), os.O_WRONLY, 0); !errors.Is(err, syscall.EROFS) {
		t.Errorf("open for writing: %v, want EROFS", err)
	}
	mu.Lock()
	sort.Strings(opened)
	if got := strings.Join(opened, " "); got != "bin/ping empty etc/passwd" {
		t.Errorf("OnOpen saw %q", got)
	}
	mu.Unlock()
}

func listXattrs(t *testing.T, p string) []string {
	t.Helper()
	buf := make([]byte, 4096)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		t.Fatalf("listxattr %s: %v", p, err)
	}
	var ks []string
	for _, k := range strings.Split(string(buf[:n]), "\x00") {
		if k != "" {
			ks = append(ks, k)
		}
	}
	return ks
}

func TestReadBlocksUntilArrival(t *testing.T) {
	requireFUSE(t)
	s := openStore(t)
	c := randomContent(t, 2, 300_000, 100_000)
	c.expect(t, s)
	mnt := mountLayer(t, s, []api.Entry{c.entry("big", 0o644)})

	f, err := os.Open(filepath.Join(mnt, "big"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	type result struct {
		p   []byte
		err error
	}
	read := func(off int64) chan result {
		ch := make(chan result, 1)
		go func() {
			p := make([]byte, 10_000)
			_, err := f.ReadAt(p, off)
			ch <- result{p, err}
		}()
		return ch
	}
	// Chunk 1 arrives first: a read inside it is served while the rest of
	// the file is still missing.
	r1 := read(150_000)
	c.write(t, s, 1)
	select {
	case r := <-r1:
		if r.err != nil || !bytes.Equal(r.p, c.data[150_000:160_000]) {
			t.Fatalf("read of an arrived chunk: %v", r.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("read not served after its chunk arrived")
	}
	r0 := read(0)
	c.write(t, s, 0)
	c.write(t, s, 2)
	select {
	case r := <-r0:
		if r.err != nil || !bytes.Equal(r.p, c.data[:10_000]) {
			t.Fatalf("read: %v", r.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("read not served after its chunk arrived")
	}
	// The handle opened before completion keeps working after it, and a
	// new open reads the whole file.
	got, err := os.ReadFile(filepath.Join(mnt, "big"))
	if err != nil || !bytes.Equal(got, c.data) {
		t.Fatalf("whole file after arrival: %v", err)
	}
	p := make([]byte, len(c.data))
	if n, err := f.ReadAt(p, 0); n != len(p) || !bytes.Equal(p, c.data) {
		t.Fatalf("old handle after arrival: %d, %v", n, err)
	}
}

func TestFailedContentEIO(t *testing.T) {
	requireFUSE(t)
	s := openStore(t)
	a := randomContent(t, 3, 1000, 1000)
	b := randomContent(t, 4, 1000, 1000)
	a.expect(t, s)
	b.expect(t, s)
	mnt := mountLayer(t, s, []api.Entry{a.entry("a", 0o644), b.entry("b", 0o644)})

	// A read already waiting gets EIO when the bundle fails for good.
	done := make(chan error, 1)
	go func() {
		_, err := os.ReadFile(filepath.Join(mnt, "a"))
		done <- err
	}()
	// Whether the read is already waiting or arrives after the failure,
	// it cannot complete any other way than with EIO.
	s.Fail(a.d, errors.New("bundle failed"))
	select {
	case err := <-done:
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("read of failed content: %v, want EIO", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("read not released by failure")
	}
	s.FailPending(errors.New("gone"))
	if _, err := os.ReadFile(filepath.Join(mnt, "b")); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read after FailPending: %v, want EIO", err)
	}
}

func TestReadInterrupted(t *testing.T) {
	requireFUSE(t)
	s := openStore(t)
	c := randomContent(t, 5, 1000, 1000)
	c.expect(t, s)
	mnt := mountLayer(t, s, []api.Entry{c.entry("never", 0o644)})
	t.Cleanup(func() { s.Fail(c.d, errors.New("test over")) }) // never leave a reader stuck

	// A direct read is a synchronous FUSE request, which the kernel
	// interrupts when the reader gets a signal. (Page-cache readahead
	// requests are not interruptible; Unmount ends those.)
	cmd := exec.Command("dd", "if="+filepath.Join(mnt, "never"), "iflag=direct", "bs=4096", "count=1", "of=/dev/null")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	// Wait until dd sleeps in the FUSE request, then kill it: the kernel
	// interrupts the request, which must cancel the store read.
	wchan := filepath.Join("/proc", strconv.Itoa(cmd.Process.Pid), "wchan")
	for deadline := time.Now().Add(30 * time.Second); ; {
		b, _ := os.ReadFile(wchan)
		if strings.Contains(string(b), "fuse") || strings.Contains(string(b), "request_wait_answer") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("dd never blocked in FUSE (wchan %q)", b)
		}
		time.Sleep(10 * time.Millisecond)
	}
	cmd.Process.Kill()
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		t.Fatal("killed reader stays blocked: the interrupt did not cancel the read")
	}
}

func TestPassthrough(t *testing.T) {
	requireFUSE(t)
	s := openStore(t)
	c := randomContent(t, 6, 5<<20, 1<<20)
	c.put(t, s)
	mnt := mountLayer(t, s, []api.Entry{c.entry("f", 0o644)})
	before := servedReads.Load()
	got, err := os.ReadFile(filepath.Join(mnt, "f"))
	if err != nil || !bytes.Equal(got, c.data) {
		t.Fatalf("read: %v", err)
	}
	if n := servedReads.Load() - before; n != 0 {
		t.Errorf("%d reads of a complete file reached the FUSE server; want 0 (passthrough)", n)
	}
}

// TestOverlay stacks two layer views under overlayfs, as the snapshotter
// does for a container, and checks the container's view.
func TestOverlay(t *testing.T) {
	requireFUSE(t)
	s := openStore(t)
	keep := newContent(t, []byte("kept\n"), 1024)
	old := newContent(t, []byte("old\n"), 1024)
	newer := newContent(t, []byte("new\n"), 1024)
	for _, c := range []*content{keep, old, newer} {
		c.put(t, s)
	}
	lower := mountLayer(t, s, []api.Entry{
		{Name: "etc", Type: api.TypeDir, Mode: 0o755},
		keep.entry("etc/keep", 0o644),
		old.entry("etc/gone", 0o644),
		{Name: "data", Type: api.TypeDir, Mode: 0o755},
		old.entry("data/a", 0o644),
		old.entry("data/sub/b", 0o644),
		old.entry("file", 0o644),
	})
	upper := mountLayer(t, s, []api.Entry{
		{Name: "etc/.wh.gone", Type: api.TypeReg},
		{Name: "data", Type: api.TypeDir, Mode: 0o755},
		{Name: "data/.wh..wh..opq", Type: api.TypeReg},
		newer.entry("data/c", 0o644),
		newer.entry("file", 0o600),
	})

	root, work, mnt := t.TempDir(), t.TempDir(), t.TempDir()
	opts := "lowerdir=" + upper + ":" + lower + ",upperdir=" + root + ",workdir=" + work
	if err := unix.Mount("overlay", mnt, "overlay", 0, opts); err != nil {
		t.Fatalf("mount overlay: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})

	exists := func(name string) bool {
		_, err := os.Lstat(filepath.Join(mnt, name))
		return err == nil
	}
	for name, want := range map[string]bool{
		"etc/keep": true, "etc/gone": false,
		"data/a": false, "data/sub": false, "data/c": true, "file": true,
	} {
		if got := exists(name); got != want {
			t.Errorf("%s exists = %v, want %v", name, got, want)
		}
	}
	for name, want := range map[string]string{"etc/keep": "kept\n", "data/c": "new\n", "file": "new\n"} {
		if got, err := os.ReadFile(filepath.Join(mnt, name)); err != nil || string(got) != want {
			t.Errorf("%s: %q, %v; want %q", name, got, err, want)
		}
	}
	if fi, err := os.Stat(filepath.Join(mnt, "file")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("file mode: %v, %v", fi.Mode(), err)
	}
	// The container can write: copy-up from a FUSE lower works.
	if err := os.WriteFile(filepath.Join(mnt, "etc/keep"), []byte("changed"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(root, "etc/keep")); string(got) != "changed" {
		t.Errorf("copy-up: upper dir holds %q", got)
	}
	if got, _ := os.ReadFile(filepath.Join(lower, "etc/keep")); string(got) != "kept\n" {
		t.Errorf("layer changed under the container: %q", got)
	}
}
