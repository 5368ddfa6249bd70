package fdstore

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// listenFDsStart is the first descriptor systemd passes (SD_LISTEN_FDS_START).
const listenFDsStart = 3

// systemdStore is systemd's file descriptor store, through the sd_notify
// protocol (sd_notify(3), sd_listen_fds_with_names(3)); no library needed.
type systemdStore struct {
	socket string // $NOTIFY_SOCKET
}

// openSystemd reads the descriptors systemd handed back (LISTEN_FDS,
// LISTEN_FDNAMES, for this process: LISTEN_PID) and unsets those
// variables, so that no child inherits them.
func openSystemd() (*systemdStore, map[string][]*os.File, error) {
	socket := os.Getenv("NOTIFY_SOCKET")
	if socket == "" {
		return nil, nil, fmt.Errorf("fdstore: systemd's store needs NOTIFY_SOCKET (run the worker as a systemd service " +
			"with Type=notify or NotifyAccess=main and FileDescriptorStoreMax=)")
	}
	passed, err := listenFDs()
	if err != nil {
		return nil, nil, err
	}
	return &systemdStore{socket: socket}, passed, nil
}

func listenFDs() (map[string][]*os.File, error) {
	defer func() {
		os.Unsetenv("LISTEN_PID")
		os.Unsetenv("LISTEN_FDS")
		os.Unsetenv("LISTEN_FDNAMES")
	}()
	out := make(map[string][]*os.File)
	pid, err := strconv.Atoi(os.Getenv("LISTEN_PID"))
	if err != nil || pid != os.Getpid() {
		return out, nil
	}
	n, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || n <= 0 {
		return out, nil
	}
	names := strings.Split(os.Getenv("LISTEN_FDNAMES"), ":")
	for i := 0; i < n; i++ {
		fd := listenFDsStart + i
		unix.CloseOnExec(fd)
		name := "unknown"
		if i < len(names) && names[i] != "" {
			name = names[i]
		}
		out[name] = append(out[name], os.NewFile(uintptr(fd), name))
	}
	return out, nil
}

func (s *systemdStore) keep(name string, f *os.File) error {
	fd, err := fileDescriptor(f)
	if err != nil {
		return err
	}
	return sdNotify(s.socket, "FDSTORE=1\nFDNAME="+name+"\n", fd)
}

func (s *systemdStore) drop(name string) error {
	return sdNotify(s.socket, "FDSTOREREMOVE=1\nFDNAME="+name+"\n", -1)
}

func (s *systemdStore) close() error { return nil }

// NotifyReady tells systemd, if the worker runs as a Type=notify service,
// that it is ready. It does nothing outside systemd.
func NotifyReady() error {
	socket := os.Getenv("NOTIFY_SOCKET")
	if socket == "" {
		return nil
	}
	return sdNotify(socket, "READY=1\n", -1)
}

// sdNotify sends one notification datagram to socket (a path, or an
// abstract name starting with @), with fd attached if fd >= 0.
func sdNotify(socket, state string, fd int) error {
	// x/sys/unix maps a leading @ to the abstract namespace.
	addr := &unix.SockaddrUnix{Name: socket}
	s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer unix.Close(s)
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	if err := unix.Sendmsg(s, []byte(state), oob, addr, 0); err != nil {
		return fmt.Errorf("sd_notify %s: %w", socket, err)
	}
	return nil
}
