package fs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// conn serves one FUSE connection (a /dev/fuse descriptor) with go-fuse's
// protocol implementation over a layerFS. This package reads and writes
// the descriptor itself, instead of letting fuse.Server do it, because a
// fuse.Server insists on reading the kernel's INIT first, and a connection
// taken over from an earlier process was initialised long ago: the saved
// INIT is replayed into the protocol server instead (takeOver).
//
// One goroutine reads requests; each request is handled in its own
// goroutine, since a read may wait for its content for a long time. The
// descriptor is non-blocking and the reader waits in poll(2) on it and on a
// wake-up pipe, outside Go's poller: a process that opens files of its own
// FUSE mount makes the kernel ask the server about them from inside
// epoll_ctl on the poller's epoll, and a server read through that same
// poller would never see the question (go-fuse's "poll hack" explains the
// same deadlock).
type conn struct {
	// mu guards fd against its closing while a syscall uses it.
	mu       sync.RWMutex
	fd       int
	closed   bool
	wakeR    int // the reader also polls this; detach and close write wakeW
	wakeW    int
	ps       *fuse.ProtocolServer
	fs       *layerFS
	maxWrite int
	debug    bool
	// detached is set when this process stops serving the connection
	// but leaves it mounted: requests read from then on are left to the
	// next server, and no answer is written any more.
	detached atomic.Bool
	done     chan struct{} // closed when the read loop ends
}

// FUSE opcodes and notification codes of the kernel ABI
// (include/uapi/linux/fuse.h) that the loop needs to know about.
const (
	opReadlink    = 5
	opRead        = 15
	opGetxattr    = 22
	opListxattr   = 23
	opInit        = 26
	opReaddir     = 28
	opReaddirplus = 44
	// notifyResend asks the kernel to queue again every request a
	// server has read and not answered (Linux 6.9).
	notifyResend = 7

	inHeaderSize  = 40
	outHeaderSize = 16
	// replySlack bounds the fixed part of any reply and a symlink
	// target (PATH_MAX).
	replySlack = 8192
)

// newConn serves fd (non-blocking), which it owns from now on.
func newConn(fd int, l *layerFS, mo *fuse.MountOptions) (*conn, error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, err
	}
	return &conn{
		fd: fd, wakeR: p[0], wakeW: p[1], fs: l, maxWrite: mo.MaxWrite, debug: mo.Debug,
		ps:   fuse.NewProtocolServer(l, mo),
		done: make(chan struct{}),
	}, nil
}

// mountFUSE opens /dev/fuse and mounts it on mountpoint, read-only, with
// the kernel checking permissions against the served modes and owners
// (default_permissions) as on a local filesystem.
func mountFUSE(mountpoint string, mo *fuse.MountOptions) (int, error) {
	var st unix.Stat_t
	if err := unix.Stat(mountpoint, &st); err != nil {
		return -1, err
	}
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return -1, fmt.Errorf("opening /dev/fuse: %w", err)
	}
	data := fmt.Sprintf("fd=%d,rootmode=%o,user_id=%d,group_id=%d,max_read=%d,default_permissions,allow_other",
		fd, st.Mode&unix.S_IFMT, os.Geteuid(), os.Getegid(), mo.MaxWrite)
	if err := unix.Mount(mo.FsName, mountpoint, "fuse."+mo.Name, unix.MS_RDONLY, data); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("mount: %w", err)
	}
	return fd, nil
}

// readBufferSize is what one read of the device needs: the kernel refuses
// a buffer that cannot hold a request of max_write bytes.
func (c *conn) readBufferSize() int { return max(c.maxWrite+4096, 64<<10) }

// errDetached ends the read loop of a detached connection.
var errDetached = errors.New("detached")

// read waits for and reads one request. timeout < 0 waits for ever.
func (c *conn) read(buf []byte, timeout time.Duration) (int, error) {
	ms := -1
	if timeout >= 0 {
		ms = int(timeout.Milliseconds())
	}
	for {
		var n int
		err := c.withFD(func(fd int) error {
			p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}, {Fd: int32(c.wakeR), Events: unix.POLLIN}}
			k, err := unix.Poll(p, ms)
			switch {
			case err != nil:
				return err
			case k == 0:
				return os.ErrDeadlineExceeded
			case p[1].Revents != 0:
				return errDetached
			}
			n, err = unix.Read(fd, buf)
			return err
		})
		switch {
		case err == nil:
			return n, nil
		case errors.Is(err, unix.EINTR), errors.Is(err, unix.EAGAIN), errors.Is(err, unix.ENOENT):
			// ENOENT: the request was interrupted and is gone;
			// EAGAIN: another reader took it.
			continue
		default:
			return 0, err
		}
	}
}

// withFD runs f on the descriptor unless it is closed.
func (c *conn) withFD(f func(fd int) error) error {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.closed {
		return fs.ErrClosed
	}
	return f(c.fd)
}

func (c *conn) write(b []byte) error {
	return c.withFD(func(fd int) error {
		_, err := unix.Write(fd, b)
		return err
	})
}

// file returns a duplicate of the descriptor, for a keeper.
func (c *conn) file() (*os.File, error) {
	var dup int
	err := c.withFD(func(fd int) (err error) {
		dup, err = unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(dup), "/dev/fuse"), nil
}

// initNew answers the kernel's INIT on a new connection and returns what
// a takeover will need to replay it.
func (c *conn) initNew() (*mountState, error) {
	buf := make([]byte, c.readBufferSize())
	n, err := c.read(buf, 30*time.Second)
	if err != nil {
		return nil, fmt.Errorf("reading the kernel's INIT: %w", err)
	}
	req := buf[:n:n]
	if n < inHeaderSize || binary.NativeEndian.Uint32(req[4:8]) != opInit {
		return nil, fmt.Errorf("the first request of the connection is not INIT")
	}
	reply, err := c.handleInit(req)
	if err != nil {
		return nil, err
	}
	if err := c.write(reply); err != nil {
		return nil, fmt.Errorf("answering INIT: %w", err)
	}
	return &mountState{Version: mountStateVersion, Init: append([]byte(nil), req...), InitReply: reply, MaxWrite: c.maxWrite}, nil
}

// handleInit runs an INIT request through the protocol server, which
// records the kernel's settings, and returns the reply.
func (c *conn) handleInit(req []byte) ([]byte, error) {
	out := make([]byte, replySlack)
	n, st := c.ps.HandleRequest([][]byte{req}, [][]byte{out})
	if !st.Ok() || n < outHeaderSize {
		return nil, fmt.Errorf("handling INIT: %v", st)
	}
	if errno := int32(binary.NativeEndian.Uint32(out[4:8])); errno != 0 {
		return nil, fmt.Errorf("handling INIT: the protocol server refused it (%v)", syscall.Errno(-errno))
	}
	return out[:n:n], nil
}

// resend asks the kernel to send again what an earlier server read and did
// not answer.
func (c *conn) resend() error {
	var msg [outHeaderSize]byte
	binary.NativeEndian.PutUint32(msg[0:4], outHeaderSize)
	binary.NativeEndian.PutUint32(msg[4:8], notifyResend)
	// unique 0: a notification.
	return c.write(msg[:])
}

// serve reads and dispatches requests until the connection ends (the view
// is unmounted) or the process stops serving it (detach).
func (c *conn) serve() {
	defer close(c.done)
	buf := make([]byte, c.readBufferSize())
	for {
		n, err := c.read(buf, -1)
		if err != nil {
			switch {
			case errors.Is(err, errDetached), errors.Is(err, fs.ErrClosed):
			case errors.Is(err, syscall.ENODEV):
				// Unmounted: the kernel ended the connection.
			default:
				log.L.WithError(err).Error("reading the FUSE connection")
			}
			return
		}
		if c.detached.Load() {
			return
		}
		req := make([]byte, n)
		copy(req, buf[:n])
		go c.handle(req)
	}
}

// Reply buffers: most replies are small; reads and listings need room for
// up to max_write bytes. Pooled: a buffer per request is most of the cost
// of a read served here.
var (
	smallReplies = sync.Pool{New: func() any { b := make([]byte, outHeaderSize+replySlack+8192); return &b }}
	largeReplies sync.Pool
)

func (c *conn) replyBuffer(payload int) (*[]byte, *sync.Pool) {
	need := outHeaderSize + replySlack + payload
	if need <= outHeaderSize+replySlack+8192 {
		return smallReplies.Get().(*[]byte), &smallReplies
	}
	size := outHeaderSize + replySlack + c.maxWrite
	if need > size {
		b := make([]byte, need)
		return &b, nil
	}
	if b, ok := largeReplies.Get().(*[]byte); ok && len(*b) == size {
		return b, &largeReplies
	}
	b := make([]byte, size)
	return &b, &largeReplies
}

// handle answers one request.
func (c *conn) handle(req []byte) {
	buf, pool := c.replyBuffer(payloadSize(req))
	if pool != nil {
		defer pool.Put(buf)
	}
	out := *buf
	n, st := c.ps.HandleRequest([][]byte{req}, [][]byte{out})
	if n == 0 {
		if st.Ok() {
			return // no reply (FORGET, INTERRUPT...)
		}
		// A request the server could not answer still gets an answer,
		// its error: the caller in the kernel waits for one.
		log.L.WithField("status", st).Error("FUSE request not handled")
		n = errorReply(req, st, out)
		if n == 0 {
			return
		}
	}
	if c.detached.Load() {
		// The next server answers it: the kernel sends it again.
		return
	}
	if err := c.write(out[:n]); err != nil && !errors.Is(err, syscall.ENOENT) && !errors.Is(err, fs.ErrClosed) {
		// ENOENT: the request was interrupted meanwhile.
		if c.debug || !errors.Is(err, syscall.ENODEV) {
			log.L.WithError(err).Debug("writing a FUSE reply")
		}
	}
}

// errorReply writes into out the reply to req that carries only the error
// st (fuse_out_header: len, error, unique) and returns its length, 0 for a
// request too short to answer.
func errorReply(req []byte, st fuse.Status, out []byte) int {
	if len(req) < inHeaderSize || len(out) < outHeaderSize {
		return 0
	}
	binary.NativeEndian.PutUint32(out[0:4], outHeaderSize)
	binary.NativeEndian.PutUint32(out[4:8], uint32(-int32(st)))
	copy(out[8:16], req[8:16]) // unique
	return outHeaderSize
}

// payloadSize is the room a reply to req needs beyond its fixed part: the
// data of a read, a directory listing or an xattr value (the size the
// kernel asks for).
func payloadSize(req []byte) int {
	if len(req) < inHeaderSize {
		return 0
	}
	// Each request is checked against the size of its own fixed part: a
	// GETXATTR is the header, 8 bytes and the name.
	switch binary.NativeEndian.Uint32(req[4:8]) {
	case opRead, opReaddir, opReaddirplus:
		if len(req) < int(unsafe.Sizeof(fuse.ReadIn{})) {
			return 0
		}
		return int((*fuse.ReadIn)(unsafe.Pointer(&req[0])).Size)
	case opGetxattr, opListxattr:
		if len(req) < int(unsafe.Sizeof(fuse.GetXAttrIn{})) {
			return 0
		}
		return int((*fuse.GetXAttrIn)(unsafe.Pointer(&req[0])).Size)
	case opReadlink:
		return 0 // within replySlack
	}
	return 0
}

// detach stops this process serving the connection: the read loop ends
// (nothing more is taken from the kernel's queue) and no reply is written
// any more. The descriptor stays open until the process exits, so that the
// connection stays alive even if no keeper holds it yet.
func (c *conn) detach() {
	c.detached.Store(true)
	unix.Write(c.wakeW, []byte{0})
	<-c.done
}

// closeWhenDone closes the descriptor once the read loop has ended (the
// kernel ended the connection).
func (c *conn) closeWhenDone() {
	go func() {
		<-c.done
		c.mu.Lock()
		defer c.mu.Unlock()
		if !c.closed {
			c.closed = true
			unix.Close(c.fd)
			unix.Close(c.wakeR)
			unix.Close(c.wakeW)
		}
	}()
}

// registerBacking registers f as a backing file of the connection
// (FUSE_DEV_IOC_BACKING_OPEN) for passthrough opens, and returns its ID.
func (c *conn) registerBacking(f *os.File) (int32, error) {
	var m fuse.BackingMap
	bfd, err := fileDescriptor(f)
	if err != nil {
		return 0, err
	}
	m.Fd = int32(bfd)
	var id uintptr
	err = c.withFD(func(fd int) error {
		var errno syscall.Errno
		id, _, errno = syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), devIocBackingOpen, uintptr(unsafe.Pointer(&m)))
		if errno != 0 {
			return errno
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("registering a passthrough backing file: %w", err)
	}
	return int32(id), nil
}

// pollHack makes the kernel stop sending POLL requests for the view's files
// (go-fuse's poll hack: it opens go-fuse's magic file, which the protocol
// server answers, and polls it; the server answers the POLL with ENOSYS and
// the kernel remembers for the connection). Without it, a process that
// adds a file of its own FUSE mount to Go's poller waits inside epoll_ctl
// for a POLL answer, which the server, in the same process, may be unable
// to give.
func pollHack(mountpoint string) error {
	fd, err := unix.Open(filepath.Join(mountpoint, ".go-fuse-epoll-hack"), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLPRI | unix.POLLOUT}}, 0)
	return nil
}

// devIocBackingOpen is FUSE_DEV_IOC_BACKING_OPEN, _IOW(229, 1, struct
// fuse_backing_map).
const devIocBackingOpen = 0x4010e501

// fileDescriptor returns f's descriptor without switching it to blocking
// mode (which os.File.Fd does).
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

// pollError reports whether the connection behind fd has ended: the kernel
// marks a /dev/fuse descriptor whose connection was aborted or unmounted
// with POLLERR.
func pollError(fd int) bool {
	p := []unix.PollFd{{Fd: int32(fd)}}
	if _, err := unix.Poll(p, 0); err != nil {
		return false
	}
	return p[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0
}
