package harness

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Process is a daemon started by the harness. Its output goes to LogPath.
type Process struct {
	Name    string
	LogPath string
	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error
}

// startProcess starts bin with args, stdout and stderr appended to logPath.
// The child gets SIGKILL if the test process dies, so a crashed test run
// does not leave daemons behind.
func startProcess(name, logPath string, env []string, bin string, args ...string) (*Process, error) {
	return startProcessAs(name, logPath, env, nil, bin, args...)
}

// startProcessAs is startProcess with the child's user and group set to
// cred (nil: this process's), for daemons that refuse to run as root.
func startProcessAs(name, logPath string, env []string, cred *syscall.Credential, bin string, args ...string) (*Process, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open %s log: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Credential: cred}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Process{Name: name, LogPath: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	return p, nil
}

// PID is the process id.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Exited reports whether the process has exited, and how.
func (p *Process) Exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.waitErr
	default:
		return false, nil
	}
}

// Done is closed when the process exits.
func (p *Process) Done() <-chan struct{} { return p.done }

// Stop sends SIGTERM to exactly this process, and SIGKILL if it is still
// running after grace. It returns once the process has exited.
func (p *Process) Stop(grace time.Duration) {
	if ok, _ := p.Exited(); ok {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// Kill sends SIGKILL to exactly this process and returns once it has
// exited.
func (p *Process) Kill() {
	if ok, _ := p.Exited(); ok {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// Log returns the last max bytes of the process log.
func (p *Process) Log(max int64) string { return tailFile(p.LogPath, max) }

// dumpOnFailure logs the tail of the process log if the test failed.
func (p *Process) dumpOnFailure(t T) {
	if t.Failed() {
		t.Logf("---- %s log (%s) ----\n%s\n---- end of %s log ----", p.Name, p.LogPath, p.Log(24<<10), p.Name)
	}
}

func tailFile(path string, max int64) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > max {
		_, _ = f.Seek(st.Size()-max, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return string(b)
}

// ShortTempDir makes a temporary directory directly under /tmp (or the
// root t names, see TempRooter), removed in cleanup. Unix socket paths must stay under 108 bytes, which t.TempDir()
// paths (long test names) easily exceed.
func ShortTempDir(t T, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp(tempRootOf(t), "sl-"+prefix)
	if err != nil {
		t.Fatalf("temp dir: %v", err)
	}
	t.Cleanup(func() {
		// Never delete through a mount that is still there.
		if err := UnmountUnder(dir); err != nil {
			t.Logf("not removing %s: %v", dir, err)
			return
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Logf("remove %s: %v", dir, err)
		}
	})
	return dir
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
// Callers retry when the daemon then fails to bind it.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// waitFor polls cond until it returns nil, the process exits, or the
// deadline passes. It returns the last error.
func waitFor(p *Process, timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = cond(); err == nil {
			return nil
		}
		if p != nil {
			if exited, werr := p.Exited(); exited {
				return fmt.Errorf("%s exited (%v) before it was ready: %w", p.Name, werr, err)
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s: %w", procName(p), timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func procName(p *Process) string {
	if p == nil {
		return "condition"
	}
	return p.Name
}

// MountPoints returns the mount points at or under dir, deepest first.
func MountPoints(dir string) ([]string, error) {
	dir = filepath.Clean(dir)
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	sort.Slice(out, func(i, j int) bool {
		di, dj := strings.Count(out[i], "/"), strings.Count(out[j], "/")
		if di != dj {
			return di > dj
		}
		return out[i] > out[j]
	})
	return out, nil
}

// unescapeMountinfo decodes the octal escapes (\040 for space...) of
// /proc/self/mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// UnmountUnder lazily unmounts everything mounted at or under dir, deepest
// first. Stacked mounts on one point are unmounted until none is left.
func UnmountUnder(dir string) error {
	var errs []error
	for round := 0; round < 8; round++ {
		mps, err := MountPoints(dir)
		if err != nil {
			return err
		}
		if len(mps) == 0 {
			return nil
		}
		errs = errs[:0]
		for _, mp := range mps {
			if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
			}
		}
	}
	if mps, _ := MountPoints(dir); len(mps) > 0 {
		errs = append(errs, fmt.Errorf("still mounted: %v", mps))
	}
	return errors.Join(errs...)
}
