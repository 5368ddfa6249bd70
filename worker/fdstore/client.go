package fdstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// holderStartTimeout bounds the wait for a holder this worker started.
const holderStartTimeout = 10 * time.Second

// holderClient is a worker's connection to the holder. It keeps its own
// duplicate of every descriptor the holder keeps, so that if the holder
// goes away while the worker runs (killed by someone), a new holder gets
// them all again.
type holderClient struct {
	ctx    context.Context
	socket string
	cmd    []string
	c      *net.UnixConn
	kept   map[string]*os.File
}

func openHolder(ctx context.Context, socket string, cmd []string) (*holderClient, map[string][]*os.File, error) {
	if len(cmd) == 0 {
		exe, err := os.Executable()
		if err != nil {
			return nil, nil, fmt.Errorf("fdstore: finding the executable that runs the fd-holder: %w", err)
		}
		cmd = []string{exe, "fd-holder", "--socket", socket}
	}
	h := &holderClient{ctx: ctx, socket: socket, cmd: cmd, kept: make(map[string]*os.File)}
	if err := h.connect(); err != nil {
		return nil, nil, err
	}
	passed, err := h.list()
	if err != nil {
		h.c.Close()
		return nil, nil, err
	}
	for name, fs := range passed {
		dup, err := dupFile(fs[0])
		if err != nil {
			return nil, nil, err
		}
		h.kept[name] = dup
	}
	return h, passed, nil
}

// connect dials the holder, starting one if none answers.
func (h *holderClient) connect() error {
	c, err := h.dial()
	if err == nil {
		h.c = c
		return nil
	}
	if err := h.start(); err != nil {
		return err
	}
	deadline := time.Now().Add(holderStartTimeout)
	for {
		c, err := h.dial()
		if err == nil {
			h.c = c
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("fdstore: the fd-holder did not come up on %s (see %s.log): %w", h.socket, h.socket, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (h *holderClient) dial() (*net.UnixConn, error) {
	return net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: h.socket, Net: "unixpacket"})
}

// start runs a holder in its own session, so that it outlives this process
// and its process group; its output goes to socket+".log".
func (h *holderClient) start() error {
	logf, err := os.OpenFile(h.socket+".log", os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("fdstore: starting the fd-holder: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(h.cmd[0], h.cmd[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("fdstore: starting the fd-holder %s: %w", strings.Join(h.cmd, " "), err)
	}
	log.G(h.ctx).WithField("pid", cmd.Process.Pid).WithField("socket", h.socket).Info("started the fd-holder")
	// Reap it if it exits while this process runs.
	go cmd.Wait() //nolint:errcheck
	return nil
}

// reconnect replaces a broken connection and gives a new holder everything
// this worker keeps.
func (h *holderClient) reconnect() error {
	if h.c != nil {
		h.c.Close()
		h.c = nil
	}
	if err := h.connect(); err != nil {
		return err
	}
	for name, f := range h.kept {
		if err := h.request("PUT "+name, f); err != nil {
			return err
		}
	}
	log.G(h.ctx).WithField("descriptors", len(h.kept)).Warn("fd store: reconnected to the fd-holder")
	return nil
}

// request sends one request, with f attached if not nil, and reads its OK.
func (h *holderClient) request(msg string, f *os.File) error {
	fd := -1
	if f != nil {
		var err error
		if fd, err = fileDescriptor(f); err != nil {
			return err
		}
	}
	if err := writeMessage(h.c, msg, fd); err != nil {
		return err
	}
	answer, fds, err := readMessage(h.c)
	for _, fd := range fds {
		unix.Close(fd)
	}
	if err != nil {
		return err
	}
	if answer != "OK" {
		return errors.New("fd-holder: " + strings.TrimPrefix(answer, "ERR "))
	}
	return nil
}

// retry runs op, reconnecting once if the connection broke.
func (h *holderClient) retry(op func() error) error {
	err := op()
	if err == nil || strings.HasPrefix(err.Error(), "fd-holder: ") {
		return err
	}
	if rerr := h.reconnect(); rerr != nil {
		return fmt.Errorf("%w (reconnecting: %v)", err, rerr)
	}
	return op()
}

func (h *holderClient) list() (map[string][]*os.File, error) {
	if err := writeMessage(h.c, "LIST", -1); err != nil {
		return nil, err
	}
	out := make(map[string][]*os.File)
	for {
		msg, fds, err := readMessage(h.c)
		if err != nil {
			return nil, fmt.Errorf("fdstore: listing the fd-holder: %w", err)
		}
		if msg == "END" {
			return out, nil
		}
		name, ok := strings.CutPrefix(msg, "FD ")
		if !ok || len(fds) != 1 {
			for _, fd := range fds {
				unix.Close(fd)
			}
			return nil, fmt.Errorf("fdstore: unexpected answer %q to LIST", msg)
		}
		out[name] = append(out[name], os.NewFile(uintptr(fds[0]), name))
	}
}

func (h *holderClient) keep(name string, f *os.File) error {
	dup, err := dupFile(f)
	if err != nil {
		return err
	}
	if err := h.retry(func() error { return h.request("PUT "+name, dup) }); err != nil {
		dup.Close()
		return err
	}
	if old := h.kept[name]; old != nil {
		old.Close()
	}
	h.kept[name] = dup
	return nil
}

func (h *holderClient) drop(name string) error {
	if old := h.kept[name]; old != nil {
		old.Close()
		delete(h.kept, name)
	}
	return h.retry(func() error { return h.request("DROP "+name, nil) })
}

func (h *holderClient) close() error {
	for name, f := range h.kept {
		f.Close()
		delete(h.kept, name)
	}
	if h.c == nil {
		return nil
	}
	return h.c.Close()
}

// dupFile duplicates f's descriptor (close-on-exec).
func dupFile(f *os.File) (*os.File, error) {
	ofd, err := fileDescriptor(f)
	if err != nil {
		return nil, err
	}
	fd, err := unix.FcntlInt(uintptr(ofd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("fdstore: duplicating a descriptor: %w", err)
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// fileDescriptor returns f's descriptor without switching it to blocking
// mode, which os.File.Fd does to the open file description that every
// duplicate shares (the worker reads its FUSE connections non-blocking).
func fileDescriptor(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var fd int
	if err := rc.Control(func(v uintptr) { fd = int(v) }); err != nil {
		return 0, err
	}
	return fd, nil
}
