package harness

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// ModTime is the modification time of every generated entry, so that
// images are reproducible.
var ModTime = time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)

// Entry is one entry of a generated layer. Name is absolute ("/bin/sh").
// Parent directories that a layer does not list are added with mode 0755.
type Entry struct {
	Name     string
	Type     byte  // tar.TypeReg (default), TypeDir, TypeSymlink, TypeLink, TypeChar, TypeBlock, TypeFifo
	Mode     int64 // permission bits incl. setuid/setgid/sticky; 0644 (0755 for dirs) when zero
	UID, GID int
	Content  []byte
	// RandomSize bytes of incompressible content from RandomSeed, for large
	// files (Content must be empty).
	RandomSize int64
	RandomSeed uint64
	// HostFile is copied as the content (e.g. /bin/busybox).
	HostFile string
	LinkName string // symlink target, or hard link target (absolute path in the image)
	DevMajor int64
	DevMinor int64
	Xattrs   map[string]string
}

// Layer is an ordered list of entries, as in the layer tar.
type Layer []Entry

// ImageSpec describes a generated image.
type ImageSpec struct {
	Name   string // the name docker load gives it, e.g. "starlight-test/tricky:v1"
	Layers []Layer
	Cmd    []string
}

// Image is a generated image in `docker save` format.
type Image struct {
	Spec    ImageSpec
	Name    string
	Archive string   // docker-save tar, for `docker load -i`
	DiffIDs []string // sha256 of each uncompressed layer tar
	Dir     string
}

// BuildImage writes spec as a `docker save` archive (manifest.json, config
// with rootfs.diff_ids, one uncompressed tar per layer). Nothing is
// downloaded: the base layer's binaries come from the host.
func BuildImage(t T, spec ImageSpec) *Image {
	t.Helper()
	dir := ShortTempDir(t, "img-")
	img, err := buildImage(dir, spec)
	if err != nil {
		t.Fatalf("build image %s: %v", spec.Name, err)
	}
	return img
}

func buildImage(dir string, spec ImageSpec) (*Image, error) {
	img := &Image{Spec: spec, Name: spec.Name, Dir: dir, Archive: filepath.Join(dir, "image.tar")}
	var layerFiles []string
	for i, l := range spec.Layers {
		p := filepath.Join(dir, fmt.Sprintf("layer%d.tar", i))
		diffID, err := writeLayerFile(p, l)
		if err != nil {
			return nil, fmt.Errorf("layer %d: %w", i, err)
		}
		img.DiffIDs = append(img.DiffIDs, diffID)
		layerFiles = append(layerFiles, p)
	}
	cmd := spec.Cmd
	if cmd == nil {
		cmd = []string{"/bin/sh"}
	}
	history := make([]map[string]any, len(spec.Layers))
	for i := range history {
		history[i] = map[string]any{"created": ModTime, "created_by": fmt.Sprintf("starlight harness layer %d", i)}
	}
	cfg, err := json.Marshal(map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"created":      ModTime,
		"config": map[string]any{
			"Env": []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			"Cmd": cmd,
		},
		"rootfs":  map[string]any{"type": "layers", "diff_ids": img.DiffIDs},
		"history": history,
	})
	if err != nil {
		return nil, err
	}
	cfgName := strings.TrimPrefix(Digest(cfg), "sha256:") + ".json"
	var layerNames []string
	for i := range layerFiles {
		layerNames = append(layerNames, fmt.Sprintf("%d-%s/layer.tar", i, strings.TrimPrefix(img.DiffIDs[i], "sha256:")[:12]))
	}
	manifest, err := json.Marshal([]map[string]any{{"Config": cfgName, "RepoTags": []string{spec.Name}, "Layers": layerNames}})
	if err != nil {
		return nil, err
	}
	f, err := os.Create(img.Archive)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	add := func(name string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: ModTime, Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	if err := add(cfgName, cfg); err != nil {
		return nil, err
	}
	for i, lf := range layerFiles {
		if err := addFile(tw, layerNames[i], lf); err != nil {
			return nil, err
		}
		_ = os.Remove(lf)
	}
	if err := add("manifest.json", manifest); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return img, f.Close()
}

func addFile(tw *tar.Writer, name, src string) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: st.Size(), ModTime: ModTime, Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	_, err = io.Copy(tw, f)
	return err
}

func writeLayerFile(p string, l Layer) (string, error) {
	f, err := os.Create(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if err := WriteLayer(io.MultiWriter(f, h), l); err != nil {
		return "", err
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), f.Close()
}

// WriteLayer writes l as an uncompressed layer tar (PAX, so xattrs travel
// as SCHILY.xattr records), streaming large contents.
func WriteLayer(w io.Writer, l Layer) error {
	tw := tar.NewWriter(w)
	seen := map[string]bool{}
	for _, e := range l {
		if e.Type == tar.TypeDir {
			seen[strings.Trim(e.Name, "/")] = true
		}
	}
	for _, e := range l {
		name := strings.Trim(path.Clean(e.Name), "/")
		// Parent directories first, as docker would write them.
		var parents []string
		for d := path.Dir(name); d != "." && !seen[d]; d = path.Dir(d) {
			parents = append(parents, d)
			seen[d] = true
		}
		for i := len(parents) - 1; i >= 0; i-- {
			if err := tw.WriteHeader(&tar.Header{Name: parents[i] + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: ModTime, Format: tar.FormatPAX}); err != nil {
				return err
			}
		}
		if err := writeEntry(tw, name, e); err != nil {
			return fmt.Errorf("%s: %w", e.Name, err)
		}
	}
	return tw.Close()
}

func writeEntry(tw *tar.Writer, name string, e Entry) error {
	typ := e.Type
	if typ == 0 {
		typ = tar.TypeReg
	}
	mode := e.Mode
	if mode == 0 {
		mode = 0o644
		if typ == tar.TypeDir {
			mode = 0o755
		}
	}
	hdr := &tar.Header{
		Name: name, Typeflag: typ, Mode: mode, Uid: e.UID, Gid: e.GID,
		ModTime: ModTime, Linkname: e.LinkName, Devmajor: e.DevMajor, Devminor: e.DevMinor,
		Format: tar.FormatPAX,
	}
	if typ == tar.TypeDir {
		hdr.Name += "/"
	}
	if typ == tar.TypeLink {
		hdr.Linkname = strings.TrimPrefix(path.Clean(e.LinkName), "/")
	}
	if len(e.Xattrs) > 0 {
		hdr.PAXRecords = map[string]string{}
		for k, v := range e.Xattrs {
			hdr.PAXRecords["SCHILY.xattr."+k] = v
		}
	}
	var content io.Reader
	if typ == tar.TypeReg {
		switch {
		case e.HostFile != "":
			f, err := os.Open(e.HostFile)
			if err != nil {
				return err
			}
			defer f.Close()
			st, err := f.Stat()
			if err != nil {
				return err
			}
			hdr.Size, content = st.Size(), f
		case e.RandomSize > 0:
			hdr.Size, content = e.RandomSize, RandomReader(e.RandomSeed, e.RandomSize)
		default:
			hdr.Size, content = int64(len(e.Content)), bytes.NewReader(e.Content)
		}
	}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	if content != nil {
		if _, err := io.Copy(tw, content); err != nil {
			return err
		}
	}
	return nil
}

// RandomReader returns n incompressible, reproducible bytes from seed.
func RandomReader(seed uint64, n int64) io.Reader {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	return io.LimitReader(rand.NewChaCha8(key), n)
}

// SHA256 returns the hex sha256 of the content of a regular file entry.
func (e Entry) SHA256() (string, error) {
	var h hash.Hash = sha256.New()
	switch {
	case e.HostFile != "":
		f, err := os.Open(e.HostFile)
		if err != nil {
			return "", err
		}
		defer f.Close()
		if _, err := io.Copy(h, f); err != nil {
			return "", err
		}
	case e.RandomSize > 0:
		if _, err := io.Copy(h, RandomReader(e.RandomSeed, e.RandomSize)); err != nil {
			return "", err
		}
	default:
		h.Write(e.Content)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// LayerBlob returns l as a gzip-compressed layer blob and its diff ID. For
// small layers pushed over HTTP.
func LayerBlob(l Layer) (blob []byte, diffID string, err error) {
	var raw bytes.Buffer
	if err := WriteLayer(&raw, l); err != nil {
		return nil, "", err
	}
	diffID = Digest(raw.Bytes())
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	if _, err := zw.Write(raw.Bytes()); err != nil {
		return nil, "", err
	}
	if err := zw.Close(); err != nil {
		return nil, "", err
	}
	return gz.Bytes(), diffID, nil
}

// BusyboxApplets are linked to /bin/busybox in the base layer.
var BusyboxApplets = []string{"sh", "cat", "ls", "find", "wc", "sha256sum", "stat", "echo", "sort", "head", "tail", "grep", "test", "true", "false", "sleep", "xargs", "readlink", "od", "dd", "env", "id", "mkdir", "rm", "touch", "uniq", "cut", "tr", "sed", "awk"}

// BusyboxLayer is a minimal base layer: the host's static busybox, its
// applet links, and the directories a container expects.
func BusyboxLayer() Layer {
	l := Layer{
		{Name: "/bin", Type: tar.TypeDir},
		{Name: "/bin/busybox", HostFile: "/bin/busybox", Mode: 0o755},
	}
	for _, a := range BusyboxApplets {
		l = append(l, Entry{Name: "/bin/" + a, Type: tar.TypeSymlink, LinkName: "busybox", Mode: 0o777})
	}
	l = append(l,
		Entry{Name: "/etc", Type: tar.TypeDir},
		Entry{Name: "/etc/passwd", Content: []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")},
		Entry{Name: "/etc/group", Content: []byte("root:x:0:\nnogroup:x:65534:\n")},
		Entry{Name: "/tmp", Type: tar.TypeDir, Mode: 0o1777},
		Entry{Name: "/root", Type: tar.TypeDir, Mode: 0o700},
		Entry{Name: "/proc", Type: tar.TypeDir},
		Entry{Name: "/sys", Type: tar.TypeDir},
		Entry{Name: "/dev", Type: tar.TypeDir},
	)
	return l
}

// capNetBindService is a VFS_CAP_REVISION_2 security.capability value
// granting cap_net_bind_service (effective, permitted).
func capNetBindService() string {
	b := make([]byte, 20)
	binary.LittleEndian.PutUint32(b[0:], 0x02000000|0x1) // revision 2, effective
	binary.LittleEndian.PutUint32(b[4:], 1<<10)          // permitted: CAP_NET_BIND_SERVICE
	return string(b)
}

// TrickyImage is a multi-layer image exercising what conversion and the
// worker's overlay must preserve: hard links, symlinks, empty files,
// setuid/setgid/sticky bits, owners, xattrs (security.capability and
// user.), a fifo, device nodes, whiteouts of lower files and directories,
// an opaque directory, a file modified in an upper layer, a file larger
// than a chunk, many small files and names with spaces.
func TrickyImage(name string) ImageSpec {
	l2 := Layer{
		{Name: "/data", Type: tar.TypeDir},
		{Name: "/data/hello.txt", Content: []byte("hello starlight\n")},
		{Name: "/data/empty"},
		{Name: "/data/hl-a", Content: []byte("hard linked content\n")},
		{Name: "/data/hl-b", Type: tar.TypeLink, LinkName: "/data/hl-a"},
		{Name: "/data/sub/hl-c", Type: tar.TypeLink, LinkName: "/data/hl-a"},
		{Name: "/data/link", Type: tar.TypeSymlink, LinkName: "hl-a", Mode: 0o777},
		{Name: "/data/abs-link", Type: tar.TypeSymlink, LinkName: "/data/hello.txt", Mode: 0o777},
		{Name: "/data/dangling", Type: tar.TypeSymlink, LinkName: "/nonexistent/target", Mode: 0o777},
		{Name: "/data/setuid", Mode: 0o4755, Content: []byte("#!/bin/sh\necho setuid\n")},
		{Name: "/data/setgid", Mode: 0o2755, Content: []byte("#!/bin/sh\necho setgid\n")},
		{Name: "/data/sticky", Type: tar.TypeDir, Mode: 0o1777},
		{Name: "/data/owned", Mode: 0o640, UID: 1000, GID: 1001, Content: []byte("owned by 1000:1001\n")},
		{Name: "/data/caps", Mode: 0o755, Content: []byte("#!/bin/sh\necho caps\n"),
			Xattrs: map[string]string{"security.capability": capNetBindService(), "user.starlight": "hello-xattr"}},
		{Name: "/data/fifo", Type: tar.TypeFifo, Mode: 0o644},
		{Name: "/data/chardev", Type: tar.TypeChar, Mode: 0o666, DevMajor: 1, DevMinor: 3},
		{Name: "/data/blockdev", Type: tar.TypeBlock, Mode: 0o660, DevMajor: 7, DevMinor: 0},
		{Name: "/data/name with spaces.txt", Content: []byte("spaces\n")},
		{Name: "/data/todelete", Content: []byte("deleted in layer 3\n")},
		{Name: "/data/dir-todelete/inner", Content: []byte("deleted with its dir\n")},
		{Name: "/data/modeonly", Mode: 0o644, Content: []byte("mode changes in layer 3\n")},
		{Name: "/data/big", RandomSize: 6 << 20, RandomSeed: 1},
		{Name: "/opq/a", Content: []byte("a\n")},
		{Name: "/opq/sub/b", Content: []byte("b\n")},
	}
	for i := 0; i < 200; i++ {
		l2 = append(l2, Entry{Name: fmt.Sprintf("/many/f%03d", i), Content: []byte(fmt.Sprintf("small file %d\n", i))})
	}
	l3 := Layer{
		{Name: "/data", Type: tar.TypeDir},
		{Name: "/data/.wh.todelete"},
		{Name: "/data/.wh.dir-todelete"},
		{Name: "/data/hello.txt", Content: []byte("hello again from layer 3\n")},
		{Name: "/data/modeonly", Mode: 0o600, Content: []byte("mode changes in layer 3\n")},
		{Name: "/opq", Type: tar.TypeDir},
		{Name: "/opq/.wh..wh..opq"},
		{Name: "/opq/new", Content: []byte("new in layer 3\n")},
		{Name: "/small.txt", Content: []byte("small file at the root\n")},
	}
	return ImageSpec{Name: name, Layers: []Layer{BusyboxLayer(), l2, l3}}
}

// LazyImage is an image whose base layer holds /small.txt and whose second
// layer holds bigSize bytes of incompressible data in /big.bin.
func LazyImage(name string, bigSize int64) ImageSpec {
	base := append(BusyboxLayer(), Entry{Name: "/small.txt", Content: []byte("small file at the root\n")})
	big := Layer{{Name: "/big.bin", RandomSize: bigSize, RandomSeed: 42}}
	return ImageSpec{Name: name, Layers: []Layer{base, big}}
}

// Lookup returns the entry that defines name in the merged image (the last
// layer that lists it), ignoring whiteouts.
func (s ImageSpec) Lookup(name string) (Entry, bool) {
	for i := len(s.Layers) - 1; i >= 0; i-- {
		for _, e := range s.Layers[i] {
			if path.Clean(e.Name) == path.Clean(name) {
				return e, true
			}
		}
	}
	return Entry{}, false
}

// sortedKeys is a helper for deterministic output.
func sortedKeys[M ~map[string]V, V any](m M) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
