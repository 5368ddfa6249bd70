package fs

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/starlight-project/starlight/api"
)

// memKeeper keeps descriptors in this process, as the fd-holder does in
// its own: a takeover by a new MountedLayer in the same process goes
// through the same path as one by a new worker.
type memKeeper struct {
	mu  sync.Mutex
	fds map[string]*os.File
}

func newMemKeeper(t *testing.T) *memKeeper {
	k := &memKeeper{fds: make(map[string]*os.File)}
	t.Cleanup(func() {
		k.mu.Lock()
		defer k.mu.Unlock()
		for _, f := range k.fds {
			f.Close()
		}
	})
	return k
}

func (k *memKeeper) Keep(name string, f *os.File) error {
	ofd, err := fileDescriptor(f)
	if err != nil {
		return err
	}
	fd, err := unix.FcntlInt(uintptr(ofd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if old := k.fds[name]; old != nil {
		old.Close()
	}
	k.fds[name] = os.NewFile(uintptr(fd), name)
	return nil
}

func (k *memKeeper) Take(name string) (*os.File, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	f := k.fds[name]
	if f == nil {
		return nil, false
	}
	ofd, err := fileDescriptor(f)
	if err != nil {
		return nil, false
	}
	fd, err := unix.FcntlInt(uintptr(ofd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, false
	}
	return os.NewFile(uintptr(fd), name), true
}

func (k *memKeeper) Drop(name string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if f := k.fds[name]; f != nil {
		f.Close()
		delete(k.fds, name)
	}
	return nil
}

// TestTakeover stops serving a view (Detach, as a stopping worker does)
// while a reader waits for a content that has not arrived and other files
// are open, mounts the same layer again with the same keeper, and checks
// what a container would: the waiting read completes with the right data,
// open files keep reading, stat and lookups of names the kernel cached
// answer, and new opens work, whichever I/O mode their inode is in.
func TestTakeover(t *testing.T) {
	requireFUSE(t)
	s := openStore(t)
	late := randomContent(t, 10, 300_000, 100_000)    // arrives after the takeover
	done := randomContent(t, 11, 200_000, 100_000)    // complete: passthrough
	partial := randomContent(t, 12, 200_000, 100_000) // opened incomplete: served here
	late.expect(t, s)
	done.put(t, s)
	partial.expect(t, s)
	partial.write(t, s, 0)
	entries := []api.Entry{
		{Name: "dir", Type: api.TypeDir, Mode: 0o750, UID: 5, ModTime: mtime},
		late.entry("dir/late", 0o644),
		done.entry("done", 0o644),
		partial.entry("partial", 0o644),
		{Name: "link", Type: api.TypeSymlink, LinkName: "dir/late", ModTime: mtime},
	}
	tree := api.LayerTree{Digest: digest.FromString("takeover").String(), Entries: entries}
	k := newMemKeeper(t)
	mnt, state := t.TempDir(), t.TempDir()
	opts := Options{Store: s, Keeper: k, StateDir: state, Debug: os.Getenv("FSDEBUG") != ""}
	m1, err := Mount(mnt, tree, opts)
	if err != nil {
		t.Fatal(err)
	}
	if m1.TakenOver || !m1.Kept() {
		t.Fatalf("first mount: taken over %v, kept %v", m1.TakenOver, m1.Kept())
	}
	var last *MountedLayer = m1
	t.Cleanup(func() {
		if err := last.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
	})

	before, err := os.Stat(filepath.Join(mnt, "dir/late"))
	if err != nil {
		t.Fatal(err)
	}
	// Open files of both modes, held across the takeover.
	fDone, err := os.Open(filepath.Join(mnt, "done"))
	if err != nil {
		t.Fatal(err)
	}
	defer fDone.Close()
	fPartial, err := os.Open(filepath.Join(mnt, "partial"))
	if err != nil {
		t.Fatal(err)
	}
	defer fPartial.Close()
	// A reader in another process waits for the late content (a direct
	// read: a request the old server reads and never answers).
	cmd := exec.Command("dd", "if="+filepath.Join(mnt, "dir/late"), "iflag=direct", "bs=300000", "count=1", "status=none")
	var out bytes.Buffer
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	waitBlockedInFUSE(t, cmd.Process.Pid)

	if err := m1.Detach(); err != nil {
		t.Fatal(err)
	}
	// The view is still mounted; a lookup it has not answered yet waits.
	lookup := make(chan error, 1)
	go func() {
		_, err := os.Lstat(filepath.Join(mnt, "link"))
		lookup <- err
	}()

	m2, err := Mount(mnt, tree, opts)
	if err != nil {
		t.Fatal(err)
	}
	last = m2
	if !m2.TakenOver {
		t.Fatal("the second mount did not take the kept connection over")
	}
	select {
	case err := <-lookup:
		if err != nil {
			t.Fatalf("lookup issued while no server ran: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("lookup issued while no server ran never completed")
	}

	// The waiting read completes once its content arrives.
	for i := range late.frames {
		late.write(t, s, i)
	}
	select {
	case err := <-exited:
		if err != nil || !bytes.Equal(out.Bytes(), late.data) {
			t.Fatalf("the read that waited across the takeover: %v, %d bytes (want %d, equal %v)",
				err, out.Len(), len(late.data), bytes.Equal(out.Bytes(), late.data))
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the read that waited across the takeover never completed")
	}
	after, err := os.Stat(filepath.Join(mnt, "dir/late"))
	if err != nil || !os.SameFile(before, after) {
		t.Fatalf("the file is another inode after the takeover: %v", err)
	}

	// Files open across the takeover read on; new opens of the same
	// inodes agree with the kernel's I/O mode of each.
	for i := 1; i < len(partial.frames); i++ {
		partial.write(t, s, i)
	}
	for _, tc := range []struct {
		f    *os.File
		want []byte
	}{{fDone, done.data}, {fPartial, partial.data}} {
		p := make([]byte, len(tc.want))
		if n, err := tc.f.ReadAt(p, 0); n != len(p) || !bytes.Equal(p, tc.want) {
			t.Errorf("%s opened before the takeover: %d bytes, %v", tc.f.Name(), n, err)
		}
		got, err := os.ReadFile(tc.f.Name())
		if err != nil || !bytes.Equal(got, tc.want) {
			t.Errorf("%s opened after the takeover: %v", tc.f.Name(), err)
		}
	}

	// Dropping the kernel's caches makes it forget and look up again
	// nodes of both servers.
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		t.Logf("drop_caches: %v", err)
	}
	ls, err := exec.Command("ls", "-lnR", mnt).CombinedOutput()
	if err != nil || !strings.Contains(string(ls), "late") || !strings.Contains(string(ls), "link -> dir/late") {
		t.Errorf("ls -lR after the takeover: %v\n%s", err, ls)
	}
	fi, err := os.Stat(filepath.Join(mnt, "dir"))
	if err != nil || fi.Mode().Perm() != 0o750 || fi.Sys().(*syscall.Stat_t).Uid != 5 {
		t.Errorf("dir after the takeover: %v %v", fi, err)
	}
}

// waitBlockedInFUSE waits until pid sleeps in a FUSE request.
func waitBlockedInFUSE(t *testing.T, pid int) {
	t.Helper()
	wchan := filepath.Join("/proc", strconv.Itoa(pid), "wchan")
	for deadline := time.Now().Add(30 * time.Second); ; {
		b, _ := os.ReadFile(wchan)
		if strings.Contains(string(b), "fuse") || strings.Contains(string(b), "request_wait_answer") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d never blocked in FUSE (wchan %q)", pid, b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestIOModesLog: the last record of an inode wins, and a record torn by a
// crash (its open was never answered) does not count.
func TestIOModesLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "io-modes")
	if err := os.WriteFile(path, []byte("p 2 7\nc 3\nc 4\nz 4\np 5 9\nc 5\np 6"), 0o600); err != nil {
		t.Fatal(err)
	}
	m, err := loadIOModes(path)
	if err != nil {
		t.Fatal(err)
	}
	defer m.close()
	never := func() (int32, bool) { t.Error("registered a backing file for an inode with a mode"); return 0, false }
	complete := func() (int32, bool) { return 11, true }
	for _, tc := range []struct {
		ino         uint64
		passthrough func() (int32, bool)
		wantPT      bool
		wantID      int32
	}{
		{2, never, true, 7},     // passthrough for good, same backing ID
		{3, never, false, 0},    // opens served by the earlier process may be live
		{4, complete, true, 11}, // they were all released: passthrough once complete
		{5, never, false, 0},    // the last record wins
		{6, complete, true, 11}, // torn record: as if never opened
	} {
		_, id, pt, err := m.open(tc.ino, tc.passthrough)
		if err != nil || pt != tc.wantPT || id != tc.wantID {
			t.Errorf("inode %d: passthrough %v id %d (%v), want %v %d", tc.ino, pt, id, err, tc.wantPT, tc.wantID)
		}
	}
	// An open served here keeps later opens served here until released.
	fh, _, pt, _ := m.open(7, func() (int32, bool) { return 0, false })
	if pt {
		t.Fatal("incomplete content opened with passthrough")
	}
	if _, _, pt, _ := m.open(7, complete); pt {
		t.Error("passthrough while an open served here is live")
	}
	m.release(7, fh)
	if _, _, pt, _ := m.open(7, complete); pt {
		t.Error("passthrough while the second open served here is live")
	}
}

// TestTakeoverRenumbered takes a view over with a tree this version of the
// worker numbers otherwise (a name added that sorts first): the inodes the
// kernel knows keep their numbers, the new one gets its own.
func TestTakeoverRenumbered(t *testing.T) {
	requireFUSE(t)
	s := openStore(t)
	c := newContent(t, []byte("c\n"), 1024)
	b := newContent(t, []byte("b\n"), 1024)
	c.put(t, s)
	b.put(t, s)
	layer := digest.FromString("renumbered").String()
	before := api.LayerTree{Digest: layer, Entries: []api.Entry{c.entry("c", 0o644), {Name: "d", Type: api.TypeDir, Mode: 0o755}}}
	after := api.LayerTree{Digest: layer, Entries: []api.Entry{b.entry("a", 0o644), c.entry("c", 0o644), {Name: "d", Type: api.TypeDir, Mode: 0o755}}}
	k := newMemKeeper(t)
	mnt, state := t.TempDir(), t.TempDir()
	opts := Options{Store: s, Keeper: k, StateDir: state}
	m1, err := Mount(mnt, before, opts)
	if err != nil {
		t.Fatal(err)
	}
	last := m1
	t.Cleanup(func() { last.Unmount() })
	inos := map[string]uint64{}
	for _, n := range []string{"c", "d"} {
		fi, err := os.Stat(filepath.Join(mnt, n))
		if err != nil {
			t.Fatal(err)
		}
		inos[n] = fi.Sys().(*syscall.Stat_t).Ino
	}
	m1.Detach()
	m2, err := Mount(mnt, after, opts)
	if err != nil {
		t.Fatal(err)
	}
	last = m2
	if !m2.TakenOver {
		t.Fatal("not taken over")
	}
	seen := map[uint64]string{}
	for _, n := range []string{"a", "c", "d"} {
		fi, err := os.Stat(filepath.Join(mnt, n))
		if err != nil {
			t.Fatal(err)
		}
		ino := fi.Sys().(*syscall.Stat_t).Ino
		if want, ok := inos[n]; ok && ino != want {
			t.Errorf("%s is inode %d after the takeover, the kernel knew it as %d", n, ino, want)
		}
		if other, dup := seen[ino]; dup {
			t.Errorf("%s and %s share inode %d", n, other, ino)
		}
		seen[ino] = n
	}
	for n, want := range map[string]string{"a": "b\n", "c": "c\n"} {
		if got, err := os.ReadFile(filepath.Join(mnt, n)); err != nil || string(got) != want {
			t.Errorf("%s: %q, %v", n, got, err)
		}
	}
}
