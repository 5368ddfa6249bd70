package harness

import (
	"os"
	"os/exec"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// TempRooter is implemented by a T whose temporary directories belong
// somewhere else than /tmp (see Env.UseScratchFilesystem).
type TempRooter interface {
	TempRoot() string
}

// TempRoot is where ShortTempDir creates e's directories; empty means /tmp.
func (e *Env) TempRoot() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.tempRoot
}

// UseScratchFilesystem mounts a fresh, journaled ext4 filesystem of size
// bytes (a sparse image file on a loop device, under /tmp) and makes it the
// root of every directory ShortTempDir creates for e from now on: the
// state of the daemons e starts. Env.Close unmounts and deletes it after
// everything else.
//
// Benchmarks use it so that every measurement writes to an identical,
// empty filesystem. Deleting the state of an earlier measurement from a
// shared one is not free for the next: ext4 without a journal skips inodes
// deleted in the last seconds when it allocates new ones, which makes
// every file creation after a large delete scan past them.
func (e *Env) UseScratchFilesystem(size int64) {
	e.Helper()
	dir, err := os.MkdirTemp("/tmp", "sl-scratch-")
	if err != nil {
		e.Fatalf("scratch filesystem: %v", err)
	}
	img := dir + ".img"
	mnt := filepath.Join(dir, "mnt")
	e.Cleanup(func() {
		if err := UnmountUnder(mnt); err != nil {
			e.Logf("scratch filesystem %s: %v", mnt, err)
		}
		if err := unix.Unmount(mnt, 0); err != nil && err != unix.EINVAL && err != unix.ENOENT {
			// Busy: detach; the loop device goes when its last user does.
			_ = unix.Unmount(mnt, unix.MNT_DETACH)
		}
		os.Remove(img)
		os.RemoveAll(dir)
	})
	if err := os.Mkdir(mnt, 0o755); err != nil {
		e.Fatalf("scratch filesystem: %v", err)
	}
	f, err := os.Create(img)
	if err == nil {
		err = f.Truncate(size)
		f.Close()
	}
	if err != nil {
		e.Fatalf("scratch filesystem: %v", err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", img).CombinedOutput(); err != nil {
		e.Fatalf("scratch filesystem: mkfs.ext4: %v\n%s", err, out)
	}
	// noinit_itable: no background zeroing of inode tables competing with
	// the measurement for the disk.
	if out, err := exec.Command("mount", "-o", "loop,noinit_itable", img, mnt).CombinedOutput(); err != nil {
		e.Fatalf("scratch filesystem: mount: %v\n%s", err, out)
	}
	e.mu.Lock()
	e.tempRoot = mnt
	e.mu.Unlock()
}

// tempRootOf returns where ShortTempDir creates directories for t.
func tempRootOf(t T) string {
	if r, ok := t.(TempRooter); ok {
		if root := r.TempRoot(); root != "" {
			return root
		}
	}
	return "/tmp"
}
