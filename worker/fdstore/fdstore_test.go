package fdstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The test binary is also the holder and the systemd-started worker of
// these tests: real separate processes.
func TestMain(m *testing.M) {
	if len(os.Args) == 3 && os.Args[1] == "fd-holder-for-test" {
		if err := Serve(context.Background(), os.Args[2], time.Second); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if len(os.Args) == 2 && os.Args[1] == "listen-fds-for-test" {
		if err := listenFDsChild(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func holderOptions(t *testing.T) Options {
	dir, err := os.MkdirTemp("", "fdst-")
	if err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(dir, "h.sock")
	t.Cleanup(func() {
		// Stop exactly the holders these tests started.
		killHolder(t, socket)
		os.RemoveAll(dir)
	})
	return Options{Mode: KindHolder, Socket: socket, HolderCommand: []string{os.Args[0], "fd-holder-for-test", socket}}
}

func holderPID(t *testing.T, socket string) int {
	t.Helper()
	b, err := os.ReadFile(socket + ".pid")
	if err != nil {
		t.Fatalf("holder pid file: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

func killHolder(t *testing.T, socket string) {
	b, err := os.ReadFile(socket + ".pid")
	if err != nil {
		return
	}
	if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid != os.Getpid() {
		syscall.Kill(pid, syscall.SIGKILL)
		waitExit(pid, 30*time.Second)
	}
}

// waitExit waits until pid is gone (or a zombie: its parent, the test,
// reaps it in its own time).
func waitExit(pid int, timeout time.Duration) bool {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return true
		}
		if f := strings.Fields(string(b)); len(f) > 2 && f[2] == "Z" {
			return true
		}
	}
	return false
}

func pipe(t *testing.T) (r, w *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return r, w
}

// TestHolderKeepsAcrossWorkers keeps a pipe's write end in the holder,
// closes every copy this process had, and gets it back from the holder
// through a new Store, as a restarted worker would.
func TestHolderKeepsAcrossWorkers(t *testing.T) {
	ctx := context.Background()
	opts := holderOptions(t)
	s1, err := Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if pid := holderPID(t, opts.Socket); pid == os.Getpid() {
		t.Fatal("the holder runs in this process")
	}
	r, w := pipe(t)
	if err := s1.Keep("pipe", w); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}

	s2, err := Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	f, ok := s2.Take("pipe")
	if !ok {
		t.Fatal("the holder did not hand the descriptor back")
	}
	if _, again := s2.Take("pipe"); again {
		t.Error("Take handed the same descriptor out twice")
	}
	if _, err := f.Write([]byte("kept")); err != nil {
		t.Fatal(err)
	}
	f.Close()
	buf := make([]byte, 4)
	if _, err := io.ReadFull(r, buf); err != nil || string(buf) != "kept" {
		t.Fatalf("read %q, %v", buf, err)
	}
	if got := s2.DropUnclaimed(ctx); len(got) != 0 {
		t.Errorf("unclaimed after Take: %v", got)
	}
}

// TestHolderForgetsEndedAndExits: a descriptor whose other end is gone is
// forgotten, and a holder that holds nothing and has no client exits.
func TestHolderForgetsEndedAndExits(t *testing.T) {
	ctx := context.Background()
	opts := holderOptions(t)
	s, err := Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	pid := holderPID(t, opts.Socket)
	r, w := pipe(t)
	if err := s.Keep("ends", w); err != nil {
		t.Fatal(err)
	}
	w.Close()
	r.Close() // the kept write end now polls POLLERR
	s.Close()

	// The holder forgets it and, with no client, exits.
	if !waitExit(pid, 30*time.Second) {
		t.Fatal("the holder still runs with nothing held and no client")
	}
	s2, err := Open(ctx, opts) // starts a new holder
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, ok := s2.Take("ends"); ok {
		t.Error("the holder handed back a descriptor whose other end was gone")
	}
}

// TestHolderRestartedWhileWorkerRuns: if the holder is killed while the
// worker runs, the worker's next Keep starts a new one and gives it every
// descriptor again.
func TestHolderRestartedWhileWorkerRuns(t *testing.T) {
	ctx := context.Background()
	opts := holderOptions(t)
	s, err := Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	r1, w1 := pipe(t)
	r2, w2 := pipe(t)
	if err := s.Keep("one", w1); err != nil {
		t.Fatal(err)
	}
	killHolder(t, opts.Socket)
	if err := s.Keep("two", w2); err != nil {
		t.Fatalf("keep after the holder died: %v", err)
	}
	w1.Close()
	w2.Close()
	s.Close()

	s2, err := Open(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	for name, r := range map[string]*os.File{"one": r1, "two": r2} {
		f, ok := s2.Take(name)
		if !ok {
			t.Errorf("%s: lost with the holder", name)
			continue
		}
		f.Write([]byte(name[:1]))
		f.Close()
		b := make([]byte, 1)
		if _, err := r.Read(b); err != nil || b[0] != name[0] {
			t.Errorf("%s: read %q, %v", name, b, err)
		}
	}
}

// TestSystemdProtocol checks the sd_notify messages against a notify
// socket, and that descriptors passed the way systemd passes them
// (LISTEN_PID, LISTEN_FDS from 3, LISTEN_FDNAMES) are taken by name.
func TestSystemdProtocol(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "notify")
	l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	t.Setenv("LISTEN_PID", "")
	s, err := Open(context.Background(), Options{Mode: KindSystemd})
	if err != nil {
		t.Fatal(err)
	}
	r, w := pipe(t)
	if err := s.Keep("fuse-abc", w); err != nil {
		t.Fatal(err)
	}
	msg, fds := recvNotify(t, l)
	if msg != "FDSTORE=1\nFDNAME=fuse-abc\n" || len(fds) != 1 {
		t.Fatalf("keep sent %q with %d descriptors", msg, len(fds))
	}
	unix.Write(fds[0], []byte("x"))
	unix.Close(fds[0])
	b := make([]byte, 1)
	if _, err := r.Read(b); err != nil || b[0] != 'x' {
		t.Fatalf("the stored descriptor is not the kept one: %q %v", b, err)
	}
	if err := s.Drop("fuse-abc"); err != nil {
		t.Fatal(err)
	}
	if msg, fds := recvNotify(t, l); msg != "FDSTOREREMOVE=1\nFDNAME=fuse-abc\n" || len(fds) != 0 {
		t.Fatalf("drop sent %q with %d descriptors", msg, len(fds))
	}
	if err := NotifyReady(); err != nil {
		t.Fatal(err)
	}
	if msg, _ := recvNotify(t, l); msg != "READY=1\n" {
		t.Fatalf("ready sent %q", msg)
	}

	// A service start: the shell's pid is the program's after exec.
	r2, w2 := pipe(t)
	_, other := pipe(t)
	cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=other:fuse-x exec "$0" listen-fds-for-test`, os.Args[0])
	cmd.ExtraFiles = []*os.File{other, w2} // descriptors 3 and 4
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sock)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	w2.Close()
	got, _ := io.ReadAll(r2)
	if string(got) != "taken fuse-x" {
		t.Fatalf("the child wrote %q into the descriptor named fuse-x", got)
	}
}

// listenFDsChild is the child of TestSystemdProtocol.
func listenFDsChild() error {
	s, err := Open(context.Background(), Options{Mode: KindSystemd})
	if err != nil {
		return err
	}
	if os.Getenv("LISTEN_FDS") != "" {
		return errors.New("LISTEN_FDS stays in the environment")
	}
	f, ok := s.Take("fuse-x")
	if !ok {
		return errors.New("no descriptor named fuse-x")
	}
	_, err = f.Write([]byte("taken fuse-x"))
	return err
}

func recvNotify(t *testing.T, l *net.UnixConn) (string, []int) {
	t.Helper()
	l.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := l.ReadMsgUnix(buf, oob)
	if err != nil {
		t.Fatal(err)
	}
	var fds []int
	cmsgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
	for _, cm := range cmsgs {
		ints, _ := unix.ParseUnixRights(&cm)
		fds = append(fds, ints...)
	}
	return string(buf[:n]), fds
}
