package fdstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// The holder protocol: one request per SOCK_SEQPACKET message, a line of
// text with at most one descriptor attached (SCM_RIGHTS), one answer each.
//
//	PUT name   (one descriptor)  → OK        keep it, replacing name
//	DROP name                    → OK        close and forget name
//	LIST                         → FD name (one descriptor) ... END
//
// An error answers "ERR message". The protocol is the contract between a
// worker and a holder started by an older (or newer) worker: extend it
// only with new verbs.
const (
	maxMessage = 4096
	// holderIdle is how long a holder that holds nothing and has no
	// client waits before it exits (also the grace after its start for
	// the worker that started it to connect).
	holderIdle = 10 * time.Second
	// sweepInterval is how often the holder looks for descriptors whose
	// connection ended.
	sweepInterval = time.Second
)

// ErrHolderRunning is returned by Serve when another holder already serves
// the socket.
var ErrHolderRunning = errors.New("fdstore: a holder already serves this socket")

// holder is the state of a holder process.
type holder struct {
	mu         sync.Mutex
	fds        map[string]int // raw: never in Go's poller, never switched to blocking
	clients    int
	lastActive time.Time
}

// Serve runs a holder on socket (idle, if > 0, replaces the wait before an
// idle holder exits): it keeps the descriptors its clients put,
// hands duplicates back, forgets those whose other end is gone (they poll
// POLLERR or POLLHUP) and returns once it has held nothing, with no client
// connected, for a while, or when ctx is done. It writes its pid to
// socket+".pid" and locks socket+".lock", so that one holder serves a
// socket.
func Serve(ctx context.Context, socket string, idle time.Duration) error {
	if idle <= 0 {
		idle = holderIdle
	}
	lock, err := os.OpenFile(socket+".lock", os.O_CREATE|os.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("fd-holder: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return ErrHolderRunning
		}
		return fmt.Errorf("fd-holder: locking %s.lock: %w", socket, err)
	}
	if err := os.Remove(socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("fd-holder: removing stale socket: %w", err)
	}
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: socket, Net: "unixpacket"})
	if err != nil {
		return fmt.Errorf("fd-holder: %w", err)
	}
	l.SetUnlinkOnClose(true)
	defer l.Close()
	if err := os.Chmod(socket, 0o600); err != nil {
		return fmt.Errorf("fd-holder: %w", err)
	}
	pidFile := socket + ".pid"
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o600); err != nil {
		return fmt.Errorf("fd-holder: %w", err)
	}
	defer os.Remove(pidFile)

	h := &holder{fds: make(map[string]int), lastActive: time.Now()}
	defer h.closeAll()
	log.G(ctx).WithField("socket", socket).WithField("pid", os.Getpid()).Info("fd-holder serving")
	go func() {
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			h.mu.Lock()
			h.clients++
			h.lastActive = time.Now()
			h.mu.Unlock()
			go h.serveClient(ctx, c)
		}
	}()
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if h.sweep(ctx, idle) {
			log.G(ctx).Info("fd-holder: nothing held and no client, exiting")
			return nil
		}
	}
}

// sweep forgets the descriptors whose connection ended and reports whether
// the holder has been idle long enough to exit.
func (h *holder) sweep(ctx context.Context, idle time.Duration) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	names := make([]string, 0, len(h.fds))
	pfds := make([]unix.PollFd, 0, len(h.fds))
	for name, fd := range h.fds {
		names = append(names, name)
		// No events asked: poll reports only POLLERR, POLLHUP and
		// POLLNVAL, and never consumes anything.
		pfds = append(pfds, unix.PollFd{Fd: int32(fd)})
	}
	if len(pfds) > 0 {
		if _, err := unix.Poll(pfds, 0); err != nil && !errors.Is(err, unix.EINTR) {
			log.G(ctx).WithError(err).Warn("fd-holder: poll")
			return false
		}
	}
	for i, p := range pfds {
		if p.Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 {
			log.G(ctx).WithField("name", names[i]).Info("fd-holder: connection ended, forgetting it")
			unix.Close(h.fds[names[i]])
			delete(h.fds, names[i])
			h.lastActive = time.Now()
		}
	}
	return len(h.fds) == 0 && h.clients == 0 && time.Since(h.lastActive) > idle
}

func (h *holder) closeAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for name, fd := range h.fds {
		unix.Close(fd)
		delete(h.fds, name)
	}
}

func (h *holder) serveClient(ctx context.Context, c *net.UnixConn) {
	defer func() {
		c.Close()
		h.mu.Lock()
		h.clients--
		h.lastActive = time.Now()
		h.mu.Unlock()
	}()
	for {
		msg, fds, err := readMessage(c)
		if err != nil {
			return
		}
		if err := h.handle(c, msg, fds); err != nil {
			log.G(ctx).WithError(err).Warn("fd-holder: answering a client")
			return
		}
	}
}

func (h *holder) handle(c *net.UnixConn, msg string, fds []int) error {
	verb, name, _ := strings.Cut(msg, " ")
	closeFDs := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	switch verb {
	case "PUT":
		if err := checkName(name); err != nil || len(fds) != 1 {
			closeFDs()
			return writeMessage(c, "ERR PUT takes a valid name and one descriptor", -1)
		}
		h.mu.Lock()
		if old, ok := h.fds[name]; ok {
			unix.Close(old)
		}
		h.fds[name] = fds[0]
		h.lastActive = time.Now()
		h.mu.Unlock()
		return writeMessage(c, "OK", -1)
	case "DROP":
		closeFDs()
		h.mu.Lock()
		if old, ok := h.fds[name]; ok {
			unix.Close(old)
			delete(h.fds, name)
		}
		h.lastActive = time.Now()
		h.mu.Unlock()
		return writeMessage(c, "OK", -1)
	case "LIST":
		closeFDs()
		h.mu.Lock()
		names := make([]string, 0, len(h.fds))
		for n := range h.fds {
			names = append(names, n)
		}
		sort.Strings(names)
		held := make([]int, len(names))
		for i, n := range names {
			held[i] = h.fds[n]
		}
		// Under the lock: a DROP must not close a descriptor while it
		// is being sent.
		defer h.mu.Unlock()
		for i, n := range names {
			if err := writeMessage(c, "FD "+n, held[i]); err != nil {
				return err
			}
		}
		return writeMessage(c, "END", -1)
	default:
		closeFDs()
		return writeMessage(c, "ERR unknown request "+strconv.Quote(verb), -1)
	}
}

// writeMessage sends one message, with descriptor fd attached if fd >= 0.
func writeMessage(c *net.UnixConn, msg string, fd int) error {
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	_, _, err := c.WriteMsgUnix([]byte(msg), oob, nil)
	return err
}

// readMessage receives one message and the descriptors attached to it
// (close-on-exec, owned by the caller).
func readMessage(c *net.UnixConn) (string, []int, error) {
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return "", nil, err
	}
	var fds []int
	if oobn > 0 {
		cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return "", nil, fmt.Errorf("fdstore: control message: %w", err)
		}
		for _, cm := range cmsgs {
			ints, err := unix.ParseUnixRights(&cm)
			if err != nil {
				continue
			}
			for _, fd := range ints {
				unix.CloseOnExec(fd)
				fds = append(fds, fd)
			}
		}
	}
	if n == 0 && oobn == 0 {
		return "", nil, errors.New("fdstore: connection closed")
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return "", nil, errors.New("fdstore: message truncated")
	}
	return string(bytes.TrimSpace(buf[:n])), fds, nil
}
