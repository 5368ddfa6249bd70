package fs

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
)

// ioModes decides, for every inode of a view, whether an open is handed to
// the kernel with passthrough or served by this process, and remembers it
// for the life of the connection, across takeovers.
//
// The kernel requires every open file of an inode to agree: while a
// passthrough open is live, every new open must be passthrough with the
// same backing file, and while an open served here (page-cache mode) is
// live, a passthrough open fails; the open that breaks the rule fails with
// EIO. A process that took over a connection does not know what the
// earlier one handed out, so the decisions go to a log next to the
// connection, written before the open is answered:
//
//	p INO ID   INO is passthrough with backing ID for good: the backing
//	           file stays registered until the connection ends, so every
//	           later process gives out the same ID
//	c INO      opens of INO served here may be live
//	z INO      no open of INO served here is live any more
//
// The last record of an inode wins. An inode whose last record is "c" when
// a process takes over stays served here for the connection's life (the
// earlier process's opens may still be live and their count is lost); an
// inode whose opens served here were all released can become passthrough
// once its content is complete.
type ioModes struct {
	mu  sync.Mutex
	log *os.File // nil: not persisted (a view that ends with its process)
	// incarnation tags the handles this process gives out (in Fh), so
	// that a release of a handle of an earlier process is recognised.
	incarnation uint32
	backing     map[uint64]int32
	// cached counts the live opens served here, per inode; inheritedCached
	// marks the inodes an earlier process may have live opens of.
	cached map[uint64]int
	// inheritedCached inodes stay served here.
	inheritedCached map[uint64]bool
}

func newIOModes() *ioModes {
	var b [4]byte
	rand.Read(b[:])
	return &ioModes{
		incarnation:     binary.NativeEndian.Uint32(b[:]) | 1,
		backing:         make(map[uint64]int32),
		cached:          make(map[uint64]int),
		inheritedCached: make(map[uint64]bool),
	}
}

// createIOModes starts the log of a new connection.
func createIOModes(path string) (*ioModes, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating the I/O mode log: %w", err)
	}
	m := newIOModes()
	m.log = f
	return m, nil
}

// loadIOModes reads the log of a connection taken over and goes on
// appending to it.
func loadIOModes(path string) (*ioModes, error) {
	m := newIOModes()
	last := make(map[uint64]byte)
	ids := make(map[uint64]int32)
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("reading the I/O mode log: %w", err)
	}
	// A record is written whole before its open is answered; a last line
	// without its newline was torn by a crash, and its open never
	// answered: it does not count.
	if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
		b = b[:i+1]
	} else {
		b = nil
	}
	for _, line := range strings.Split(string(b), "\n") {
		var (
			kind byte
			ino  uint64
			id   int32
		)
		n, _ := fmt.Sscanf(line, "%c %d %d", &kind, &ino, &id)
		if n < 2 || kind == 'p' && n < 3 {
			continue
		}
		last[ino] = kind
		if kind == 'p' {
			ids[ino] = id
		}
	}
	for ino, kind := range last {
		switch kind {
		case 'p':
			m.backing[ino] = ids[ino]
		case 'c':
			m.inheritedCached[ino] = true
		}
	}
	if m.log, err = os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err != nil {
		return nil, fmt.Errorf("opening the I/O mode log: %w", err)
	}
	return m, nil
}

func (m *ioModes) record(format string, args ...any) error {
	if m.log == nil {
		return nil
	}
	_, err := fmt.Fprintf(m.log, format, args...)
	return err
}

// open decides the mode of an open of ino. passthrough, called only when a
// passthrough open would be allowed, registers the complete content as
// the backing file and returns its ID (ok false: not complete, or refused).
// It returns the backing ID for a passthrough open, else the handle to
// give out.
func (m *ioModes) open(ino uint64, passthrough func() (int32, bool)) (fh uint64, backingID int32, pt bool, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if id, ok := m.backing[ino]; ok {
		return 0, id, true, nil
	}
	if m.inheritedCached[ino] {
		return 0, 0, false, nil
	}
	if m.cached[ino] == 0 && passthrough != nil {
		if id, ok := passthrough(); ok {
			if err := m.record("p %d %d\n", ino, id); err != nil {
				return 0, 0, false, err
			}
			m.backing[ino] = id
			return 0, id, true, nil
		}
	}
	if m.cached[ino] == 0 {
		if err := m.record("c %d\n", ino); err != nil {
			return 0, 0, false, err
		}
	}
	m.cached[ino]++
	return uint64(m.incarnation)<<32 | 1, 0, false, nil
}

// release notes the release of a handle open gave out.
func (m *ioModes) release(ino, fh uint64) {
	if fh>>32 != uint64(m.incarnation) || fh&1 == 0 {
		return // passthrough, or an earlier process's handle
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cached[ino] <= 0 {
		return
	}
	m.cached[ino]--
	if m.cached[ino] == 0 {
		delete(m.cached, ino)
		// Best effort: without it a takeover keeps serving the inode
		// here, which is safe.
		_ = m.record("z %d\n", ino)
	}
}

func (m *ioModes) close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.log != nil {
		m.log.Close()
		m.log = nil
	}
}
