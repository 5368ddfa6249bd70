// Package tempdir gives a process a temporary directory of its own, under
// a shared root, that is removed when the process closes it and, if the
// process died without closing it (kill -9, OOM kill, power loss), by the
// next process that opens a directory under the same root.
//
// A conversion spools uncompressed and converted layers (gigabytes) to
// temporary files; a registry killed mid-conversion must not leave them in
// the temporary directory forever. Putting every file of a process in one
// directory makes the leftovers of a dead process one directory to remove;
// the directory is held with flock(2) while its process lives, so a
// directory is removed only once the kernel has released its owner's lock,
// never while another live process (a replica sharing the root) uses it.
package tempdir

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Prefix starts the name of every process directory under a root.
const Prefix = "starlight-proc-"

// Dir is the temporary directory of this process.
type Dir struct {
	path string
	lock *os.File // the directory itself, opened and flock'ed
}

// Open removes the directories that dead processes left under root and
// creates this process's directory there. root is created if missing; ""
// means os.TempDir().
func Open(root string) (*Dir, error) {
	if root == "" {
		root = os.TempDir()
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("temporary directory root: %w", err)
	}
	if _, err := RemoveStale(root); err != nil {
		return nil, err
	}
	// Another process's RemoveStale may see the new directory before it
	// is locked, take the lock and remove it; the directory is then not
	// the one locked (or not there), and a new one is made.
	var lastErr error
	for range 8 {
		path, err := os.MkdirTemp(root, Prefix+"*")
		if err != nil {
			return nil, fmt.Errorf("creating temporary directory: %w", err)
		}
		d, err := lockDir(path)
		if err == nil {
			return d, nil
		}
		lastErr = err
	}
	return nil, fmt.Errorf("creating temporary directory under %s: %w", root, lastErr)
}

// lockDir locks the directory just created at path and checks that it is
// still the directory at path.
func lockDir(path string) (*Dir, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	held, err1 := f.Stat()
	named, err2 := os.Lstat(path)
	if err := errors.Join(err1, err2); err != nil || !os.SameFile(held, named) {
		f.Close()
		return nil, fmt.Errorf("%s was removed while it was being locked", path)
	}
	return &Dir{path: path, lock: f}, nil
}

// Path is the directory's path.
func (d *Dir) Path() string { return d.path }

// Close removes the directory and everything in it, then releases it.
func (d *Dir) Close() error {
	if d == nil || d.lock == nil {
		return nil
	}
	err := os.RemoveAll(d.path)
	if cerr := d.lock.Close(); err == nil {
		err = cerr
	}
	d.lock = nil
	if err != nil {
		return fmt.Errorf("removing temporary directory: %w", err)
	}
	return nil
}

// RemoveStale removes the process directories under root whose process is
// gone (their lock is free), and returns their paths. Directories of live
// processes are left alone.
func RemoveStale(root string) ([]string, error) {
	ents, err := os.ReadDir(root)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing temporary directory root: %w", err)
	}
	var removed []string
	var errs []error
	for _, e := range ents {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), Prefix) {
			continue
		}
		path := filepath.Join(root, e.Name())
		ok, err := removeIfStale(path)
		if err != nil {
			errs = append(errs, err)
		}
		if ok {
			removed = append(removed, path)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return removed, fmt.Errorf("removing leftover temporary files: %w", err)
	}
	return removed, nil
}

func removeIfStale(path string) (bool, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return false, nil // its process is alive
		}
		return false, fmt.Errorf("locking %s: %w", path, err)
	}
	if err := os.RemoveAll(path); err != nil {
		return false, err
	}
	return true, nil
}
