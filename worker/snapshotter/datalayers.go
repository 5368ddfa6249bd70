//go:build linux

package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// LayerDataDirs is optionally implemented by a Layers that can give a
// remote layer as a directory of overlayfs metadata-only files: each file
// has its own inode (owner, mode, xattrs, link count) and, through its
// trusted.overlay.redirect, takes its data from a file of a data directory
// (the worker's content store). The snapshotter stacks that directory as a
// data-only lower layer (lowerdir=...::DATA, metacopy=on), so that reading
// such a layer involves no process at all. DirAndData returns the layer's
// directory and, when it is such a directory, the data directory it needs
// ("" otherwise: a directory that needs nothing below it, like Dir's). It
// is only called when the kernel supports data-only layers
// (DataLayersSupported).
type LayerDataDirs interface {
	DirAndData(ctx context.Context, layer digest.Digest) (dir, data string, err error)
}

// DataLayersSupported checks, with a test mount in a directory of its own
// under dir, that overlayfs here stacks metadata-only files over a
// data-only layer with these mount options (Linux 6.5 and later, not with
// userxattr).
func DataLayersSupported(dir string, options []string) (err error) {
	if slices.Contains(options, "userxattr") {
		return fmt.Errorf("metadata-only files need trusted xattrs, and overlayfs uses user xattrs here")
	}
	td, err := os.MkdirTemp(dir, "datalayer-check-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(td)
	for _, d := range []string{"data", "meta", "merged"} {
		if err := os.Mkdir(filepath.Join(td, d), 0o700); err != nil {
			return err
		}
	}
	const content = "starlight"
	if err := os.WriteFile(filepath.Join(td, "data", "c"), []byte(content), 0o400); err != nil {
		return err
	}
	meta := filepath.Join(td, "meta", "f")
	if err := os.WriteFile(meta, nil, 0o644); err != nil {
		return err
	}
	if err := os.Truncate(meta, int64(len(content))); err != nil {
		return err
	}
	if err := unix.Lsetxattr(meta, "trusted.overlay.metacopy", nil, 0); err != nil {
		return fmt.Errorf("setting trusted xattrs: %w", err)
	}
	if err := unix.Lsetxattr(meta, "trusted.overlay.redirect", []byte("/c"), 0); err != nil {
		return fmt.Errorf("setting trusted xattrs: %w", err)
	}
	merged := filepath.Join(td, "merged")
	opts := append(slices.Clone(options), "metacopy=on", "lowerdir="+filepath.Join(td, "meta")+"::"+filepath.Join(td, "data"))
	if err := unix.Mount("overlay", merged, "overlay", unix.MS_RDONLY, joinOptions(opts)); err != nil {
		return fmt.Errorf("overlayfs refuses a data-only layer (Linux 6.5 or later needed): %w", err)
	}
	defer func() {
		if uerr := unix.Unmount(merged, 0); uerr != nil && err == nil {
			err = uerr
		}
	}()
	got, err := os.ReadFile(filepath.Join(merged, "f"))
	if err != nil {
		return fmt.Errorf("reading through a data-only layer: %w", err)
	}
	if string(got) != content {
		return fmt.Errorf("a metadata-only file over a data-only layer reads %q, not its data", got)
	}
	return nil
}

func joinOptions(opts []string) string { return strings.Join(opts, ",") }
