// Package fdstore keeps file descriptors outside the worker process, so that
// what they hold open outlives a restart, a crash or an upgrade of the
// worker. The worker keeps there the /dev/fuse connection of every layer
// view it serves: as long as one copy of a connection's descriptor is open
// the kernel keeps the mount alive, and the requests of the containers that
// read through it wait in the kernel's queue until a worker serves the
// connection again.
//
// Two keepers exist:
//
//   - systemd's file descriptor store (FileDescriptorStoreMax= in the unit):
//     descriptors are handed to the service manager with sd_notify
//     "FDSTORE=1" and come back at the next start of the service in
//     LISTEN_FDS/LISTEN_FDNAMES. It survives `systemctl restart`, a crash
//     with Restart=, and with FileDescriptorStorePreserve=yes (systemd 254)
//     a stop and a start.
//   - the holder: a small process (`starlight-worker fd-holder`) that
//     receives descriptors on a unix socket (SCM_RIGHTS), never reads them,
//     and hands duplicates back to the next worker. The worker starts it
//     when none is running. It forgets a descriptor whose connection ended
//     (the view was unmounted: the descriptor polls POLLERR) and exits once
//     it holds nothing and no worker is connected.
//
// Descriptors are named; a name is at most 200 characters of
// [A-Za-z0-9._-] (systemd's FDNAME rules are wider).
package fdstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"sort"
	"sync"

	"github.com/containerd/log"
)

// Kinds of keeper.
const (
	KindSystemd = "systemd" // systemd's file descriptor store
	KindHolder  = "holder"  // the fd-holder process
)

// Modes of Open: a kind, or one of these.
const (
	ModeAuto = "auto" // systemd's store when the unit enables it, else the holder
	ModeOff  = "off"  // no keeper: views die with the worker
)

// Options configure Open.
type Options struct {
	// Mode is ModeAuto, KindSystemd, KindHolder or ModeOff.
	Mode string
	// Socket is the holder's unix socket (holder only).
	Socket string
	// HolderCommand starts a holder listening on Socket when none
	// answers: the program and its arguments. Empty: this executable
	// with `fd-holder --socket SOCKET`.
	HolderCommand []string
}

var validName = regexp.MustCompile(`^[A-Za-z0-9._-]{1,200}$`)

func checkName(name string) error {
	if !validName.MatchString(name) {
		return fmt.Errorf("fdstore: invalid name %q (1-200 characters of [A-Za-z0-9._-])", name)
	}
	return nil
}

// Store is the worker's side of a keeper. It is safe for concurrent use.
type Store struct {
	kind string

	mu sync.Mutex
	// passed are the descriptors an earlier process kept, handed back
	// at Open and not taken yet.
	passed map[string][]*os.File
	// backend is the keeper itself.
	backend backend
}

// backend is one kind of keeper.
type backend interface {
	keep(name string, f *os.File) error
	drop(name string) error
	close() error
}

// Open connects to the keeper opts.Mode selects and collects the
// descriptors an earlier worker kept. With ModeOff it returns nil, nil: a
// nil *Store keeps nothing.
func Open(ctx context.Context, opts Options) (*Store, error) {
	mode := opts.Mode
	if mode == "" {
		mode = ModeAuto
	}
	if mode == ModeAuto {
		mode = KindHolder
		if os.Getenv("FDSTORE") != "" && os.Getenv("NOTIFY_SOCKET") != "" {
			// systemd 254 and later say that the unit has a store.
			mode = KindSystemd
		} else if os.Getenv("INVOCATION_ID") != "" {
			log.G(ctx).Warn("fd store: running under systemd without a file descriptor store; " +
				"the fd-holder runs in the unit's control group and a restart of the unit stops it " +
				"(set FileDescriptorStoreMax= and fd_store = \"systemd\", see deploy/worker/starlight-worker.service)")
		}
	}
	s := &Store{kind: mode, passed: make(map[string][]*os.File)}
	switch mode {
	case ModeOff:
		return nil, nil
	case KindSystemd:
		b, passed, err := openSystemd()
		if err != nil {
			return nil, err
		}
		s.backend, s.passed = b, passed
	case KindHolder:
		if opts.Socket == "" {
			return nil, errors.New("fdstore: the holder needs a socket path (fd_holder)")
		}
		// sun_path holds 108 bytes with its terminating NUL.
		if len(opts.Socket) > 107 {
			return nil, fmt.Errorf("fdstore: the holder's socket path %s is longer than a unix socket path may be (107 bytes); set fd_holder", opts.Socket)
		}
		b, passed, err := openHolder(ctx, opts.Socket, opts.HolderCommand)
		if err != nil {
			return nil, err
		}
		s.backend, s.passed = b, passed
	default:
		return nil, fmt.Errorf("fdstore: unknown mode %q (auto, systemd, holder or off)", mode)
	}
	n := 0
	for _, fs := range s.passed {
		n += len(fs)
	}
	log.G(ctx).WithField("keeper", s.kind).WithField("descriptors", n).Info("fd store open")
	return s, nil
}

// Kind is KindSystemd or KindHolder.
func (s *Store) Kind() string { return s.kind }

// Keep hands a duplicate of f to the keeper under name, replacing what the
// holder kept under that name. The caller keeps f.
func (s *Store) Keep(name string, f *os.File) error {
	if err := checkName(name); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.backend.keep(name, f); err != nil {
		return fmt.Errorf("keeping %s: %w", name, err)
	}
	return nil
}

// Take returns the descriptor an earlier process kept under name, once. It
// stays kept: the caller gets its own duplicate.
func (s *Store) Take(name string) (*os.File, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fs := s.passed[name]
	if len(fs) == 0 {
		return nil, false
	}
	f := fs[0]
	for _, extra := range fs[1:] {
		// systemd keeps every copy stored under a name; one is
		// enough, they are the same connection.
		extra.Close()
	}
	delete(s.passed, name)
	return f, true
}

// Drop makes the keeper forget name and close its copy.
func (s *Store) Drop(name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range s.passed[name] {
		f.Close()
	}
	delete(s.passed, name)
	if err := s.backend.drop(name); err != nil {
		return fmt.Errorf("dropping %s: %w", name, err)
	}
	return nil
}

// DropUnclaimed drops every descriptor handed back at Open that nobody
// took: what an earlier worker kept for something this one does not serve
// any more. It returns their names.
func (s *Store) DropUnclaimed(ctx context.Context) []string {
	s.mu.Lock()
	names := make([]string, 0, len(s.passed))
	for name := range s.passed {
		names = append(names, name)
	}
	s.mu.Unlock()
	sort.Strings(names)
	for _, name := range names {
		if err := s.Drop(name); err != nil {
			log.G(ctx).WithError(err).Warn("fd store: dropping an unclaimed descriptor")
		}
	}
	return names
}

// Close closes this process's side (its connection to the holder, the
// descriptors nobody took). What is kept stays kept.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, fs := range s.passed {
		for _, f := range fs {
			f.Close()
		}
	}
	s.passed = map[string][]*os.File{}
	return s.backend.close()
}
