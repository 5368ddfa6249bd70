package convert

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/archive"
	"golang.org/x/sys/unix"
)

// TestConvertLayerUnpacksIdentically unpacks the source and the converted
// layer with containerd's applier (as its overlayfs snapshotter does) and
// compares the resulting trees.
func TestConvertLayerUnpacksIdentically(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: unpacking devices, owners and security.capability needs root")
	}
	want := assertUnpacksAlike(t, buildTar(t, trickyEntries()))
	// The tree really has what the test claims to compare.
	for _, name := range []string{"bin/ping", "removed", "var/opaque", "dev/sda", "bin/big-link"} {
		if _, ok := want[name]; !ok {
			t.Errorf("unpacked source lacks %s", name)
		}
	}
	if !strings.Contains(want["bin/ping"], "security.capability") || !strings.Contains(want["var/opaque"], "trusted.overlay.opaque") ||
		!strings.Contains(want["removed"], "rdev=0:0") {
		t.Errorf("unexpected unpacked metadata: %q %q %q", want["bin/ping"], want["var/opaque"], want["removed"])
	}
}

// assertUnpacksAlike unpacks the layer src and its conversion with
// containerd's applier and fails on any difference; it returns the
// unpacked source.
func assertUnpacksAlike(t *testing.T, src []byte) map[string]string {
	t.Helper()
	opts, _ := testOptions(t)
	l, err := ConvertLayer(context.Background(), bytes.NewReader(gzipBytes(t, src)), opts)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	zr, err := gzip.NewReader(l.File)
	if err != nil {
		t.Fatal(err)
	}

	orig, conv := t.TempDir(), t.TempDir()
	apply := func(dir string, r io.Reader) {
		if _, err := archive.Apply(context.Background(), dir, r, archive.WithConvertWhiteout(archive.OverlayConvertWhiteout)); err != nil {
			t.Fatalf("applying to %s: %v", dir, err)
		}
	}
	apply(orig, bytes.NewReader(src))
	apply(conv, zr)

	want, got := snapshotTree(t, orig), snapshotTree(t, conv)
	for name, w := range want {
		if g, ok := got[name]; !ok {
			t.Errorf("%s: missing from the converted layer", name)
		} else if g != w {
			t.Errorf("%s differs:\n converted %s\n original  %s", name, g, w)
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("%s: only in the converted layer", name)
		}
	}
	return want
}

// TestConvertLayerDuplicateNames converts a layer that names paths more
// than once: estargz keeps one entry per name, conversion must keep what
// containerd's applier makes of them.
func TestConvertLayerDuplicateNames(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIPPED: unpacking owners needs root")
	}
	i := 0
	mt := func() time.Time { i++; return baseTime.Add(time.Duration(i) * time.Hour) }
	pax := func(h tar.Header, kv ...string) tar.Header {
		h.PAXRecords, h.Format = map[string]string{}, tar.FormatPAX
		for j := 0; j < len(kv); j += 2 {
			h.PAXRecords["SCHILY.xattr."+kv[j]] = kv[j+1]
		}
		return h
	}
	dir := func(name string, mode int64) tar.Header {
		return tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, ModTime: mt()}
	}
	reg := func(name string, data string) tarEntry {
		return tarEntry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: mt()}, data: []byte(data)}
	}
	link := tar.Header{Typeflag: tar.TypeLink, Name: "e/l", Linkname: "t", Mode: 0o600, Uid: 5, ModTime: mt()}
	entries := []tarEntry{
		{hdr: pax(dir("d/", 0o700), "user.a", "1", "user.b", "1")},
		reg("d/f", "f"),
		// A directory again: its metadata, and its xattrs over the first's.
		{hdr: pax(dir("d/", 0o750), "user.b", "2")},
		{hdr: dir("e/", 0o755)},
		reg("e/x", "x"),
		reg("t", "target"),
		// The link goes with e, its header's effect on t stays.
		{hdr: link},
		reg("e", "e is a file now"),
		// A directory's mtime is set again once the layer is applied,
		// on what is at its path then.
		{hdr: dir("m/", 0o755)},
		reg("m", "m is a file now"),
	}
	got := assertUnpacksAlike(t, buildTar(t, entries))
	for name, want := range map[string]string{"d": "user.a=31,user.b=32", "t": "uid=5", "e": "size=15"} {
		if !strings.Contains(got[name], want) {
			t.Errorf("%s: %s, want %s in it", name, got[name], want)
		}
	}
}

// snapshotTree describes every file under root (but eStargz metadata) in a
// comparable string: type and mode, owner, size, content digest, link
// target, device, xattrs, mtime and hard link group.
func snapshotTree(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	inodes := map[uint64]string{}
	var names []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if IsMetadataEntry(rel) {
			return nil
		}
		names = append(names, rel)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(names)
	for _, rel := range names {
		p := filepath.Join(root, rel)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			t.Fatal(err)
		}
		desc := fmt.Sprintf("mode=%o uid=%d gid=%d", st.Mode, st.Uid, st.Gid)
		// The applier creates whiteout devices at unpack time and touches
		// the root while unpacking: their mtimes are not from the layer.
		whiteout := st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0
		if rel != "." && !whiteout {
			desc += fmt.Sprintf(" mtime=%d.%09d", st.Mtim.Sec, st.Mtim.Nsec)
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			desc += fmt.Sprintf(" size=%d sha256=%x", st.Size, sha256.Sum256(b))
			if first, ok := inodes[st.Ino]; ok {
				desc += " hardlink-of=" + first
			} else {
				inodes[st.Ino] = rel
			}
		case unix.S_IFLNK:
			target, err := os.Readlink(p)
			if err != nil {
				t.Fatal(err)
			}
			desc += " -> " + target
		case unix.S_IFCHR, unix.S_IFBLK:
			desc += fmt.Sprintf(" rdev=%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		}
		desc += " xattrs=" + xattrString(t, p)
		out[rel] = desc
	}
	return out
}

func xattrString(t *testing.T, p string) string {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		t.Fatalf("listxattr %s: %v", p, err)
	}
	var keys []string
	for _, k := range strings.Split(string(buf[:n]), "\x00") {
		if k != "" {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	var s []string
	for _, k := range keys {
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, k, v)
		if err != nil {
			t.Fatalf("getxattr %s %s: %v", p, k, err)
		}
		s = append(s, fmt.Sprintf("%s=%x", k, v[:m]))
	}
	return "[" + strings.Join(s, ",") + "]"
}
