package fs

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/containerd/continuity"
	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// errNotKept: no earlier process kept a connection for this mount.
var errNotKept = errors.New("no kept FUSE connection")

// mountState is what a takeover needs besides the kept descriptor,
// written next to the mount (Options.StateDir) once the connection is
// initialised.
type mountState struct {
	Version int `json:"version"`
	// Init is the kernel's INIT request, replayed into the server of a
	// takeover so that it parses requests as the kernel negotiated.
	Init []byte `json:"init"`
	// InitReply is what the first server answered: what the kernel
	// uses for the life of the connection.
	InitReply []byte `json:"initReply"`
	// MaxWrite is the negotiated max_write (the read buffer size).
	MaxWrite int `json:"maxWrite"`
	// Dev is the mount's device number ("major:minor"), to check that
	// the kept connection is the one mounted there.
	Dev string `json:"dev"`
}

const (
	mountStateVersion = 1
	mountStateFile    = "fuse.json"
	ioModesFile       = "io-modes"
)

// keptName is the keeper's name of the connection mounted on mountpoint.
func keptName(mountpoint string) string {
	sum := sha256.Sum256([]byte(filepath.Clean(mountpoint)))
	return "fuse-" + hex.EncodeToString(sum[:20])
}

func writeMountState(dir string, st *mountState) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	if err := continuity.AtomicWriteFile(filepath.Join(dir, mountStateFile), b, 0o600); err != nil {
		return fmt.Errorf("writing the mount state: %w", err)
	}
	return nil
}

func readMountState(dir string) (*mountState, error) {
	b, err := os.ReadFile(filepath.Join(dir, mountStateFile))
	if err != nil {
		return nil, err
	}
	var st mountState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("%s: %w", mountStateFile, err)
	}
	if st.Version != mountStateVersion {
		return nil, fmt.Errorf("%s: version %d, this worker knows %d", mountStateFile, st.Version, mountStateVersion)
	}
	return &st, nil
}

// takeOver serves the connection an earlier process kept for mountpoint,
// or returns errNotKept.
func takeOver(mountpoint string, layer digest.Digest, root *inode, opts Options) (_ *MountedLayer, err error) {
	name := keptName(mountpoint)
	f, ok := opts.Keeper.Take(name)
	if !ok {
		return nil, errNotKept
	}
	defer func() {
		if err != nil {
			f.Close()
			if derr := opts.Keeper.Drop(name); derr != nil {
				log.L.WithError(derr).Warn("dropping a kept FUSE connection that cannot be taken over")
			}
		}
	}()
	st, err := readMountState(opts.StateDir)
	if err != nil {
		return nil, fmt.Errorf("reading the state of the kept mount: %w", err)
	}
	ofd, err := fileDescriptor(f)
	if err != nil {
		return nil, fmt.Errorf("taking the kept connection: %w", err)
	}
	fd, err := unix.FcntlInt(uintptr(ofd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("taking the kept connection: %w", err)
	}
	f.Close()
	f = os.NewFile(uintptr(fd), "/dev/fuse") // closed on failure
	if pollError(fd) {
		return nil, errors.New("the kept connection has ended")
	}
	dev, err := mountDevice(mountpoint)
	if err != nil {
		return nil, err
	}
	if dev != st.Dev {
		return nil, fmt.Errorf("%s is mounted from device %s, the kept connection serves %s", mountpoint, dev, st.Dev)
	}
	if err := renumber(opts.StateDir, root); err != nil {
		return nil, err
	}
	// What the kernel knows from now on, new inodes included.
	if err := writeInodeMap(opts.StateDir, root); err != nil {
		return nil, err
	}
	modes, err := loadIOModes(filepath.Join(opts.StateDir, ioModesFile))
	if err != nil {
		return nil, err
	}
	mo := mountOptions(opts.Debug)
	mo.MaxWrite = st.MaxWrite
	ctx, cancel := context.WithCancel(context.Background())
	l := newLayerFS(ctx, layer, root, opts, modes)
	// From here on the connection owns a descriptor of its own.
	cfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		cancel()
		modes.close()
		return nil, err
	}
	c, err := newConn(cfd, l, mo)
	if err != nil {
		unix.Close(cfd)
		cancel()
		modes.close()
		return nil, err
	}
	l.conn = c
	reply, err := c.handleInit(st.Init)
	if err != nil {
		c.closeWhenDone()
		close(c.done)
		cancel()
		modes.close()
		return nil, err
	}
	f.Close()
	if !bytes.Equal(reply, st.InitReply) {
		// Another go-fuse version negotiates differently; the kernel
		// keeps what the first server said. Requests parse the same
		// for a read-only view, so go on, but say it.
		log.L.WithField("mountpoint", mountpoint).Warn("taking over a FUSE connection negotiated by another version of the worker")
	}
	go c.serve()
	if err := c.resend(); err != nil {
		// Before Linux 6.9: requests the old server had read and not
		// answered stay unanswered; their readers hang.
		log.L.WithError(err).WithField("mountpoint", mountpoint).
			Warn("the kernel cannot resend the requests the previous worker left unanswered (FUSE_NOTIFY_RESEND needs Linux 6.9)")
	}
	log.L.WithField("layer", layer).WithField("mountpoint", mountpoint).Debug("took over the kept FUSE connection")
	return &MountedLayer{conn: c, mountpoint: mountpoint, cancel: cancel, keeper: opts.Keeper, keptName: name,
		stateDir: opts.StateDir, TakenOver: true}, nil
}

// mountDevice returns the device number ("major:minor") of the topmost
// FUSE view mounted on mountpoint, from /proc/self/mountinfo (stat would
// ask the FUSE server, which may be this process, not serving yet).
func mountDevice(mountpoint string) (string, error) {
	mountpoint = filepath.Clean(mountpoint)
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	dev := ""
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// 36 35 0:52 / /mnt rw,relatime shared:1 - fuse.starlight starlight ro,...
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, fl := range fields {
			if fl == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || sep+1 >= len(fields) || unescapeMountinfo(fields[4]) != mountpoint {
			continue
		}
		if fields[sep+1] == "fuse."+mountOptions(false).Name {
			dev = fields[2]
		} else {
			dev = "" // something else is mounted on top
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	if dev == "" {
		return "", fmt.Errorf("no FUSE view is mounted on %s", mountpoint)
	}
	return dev, nil
}

// unescapeMountinfo decodes the octal escapes (\040 for a space...) of
// mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

var _ fuse.RawFileSystem = (*layerFS)(nil)

// The inode map: the node IDs a connection gave out, by path. Node IDs are
// the tree's inode numbers, which a later version of the worker may number
// otherwise (a fix in how a layer's tree is built): a takeover gives every
// inode the number the connection knows it by, found by any of its names,
// and the inodes the earlier worker did not have new numbers.
const inodeMapFile = "inodes"

// walkNames calls f for every name of the tree in assignInodes' order: the
// first call for an inode is with the path it was numbered by.
func walkNames(root *inode, f func(p string, n *inode)) {
	seen := make(map[*inode]bool)
	var walk func(p string, n *inode)
	walk = func(p string, n *inode) {
		f(p, n)
		if seen[n] {
			return
		}
		seen[n] = true
		names := make([]string, 0, len(n.children))
		for k := range n.children {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			walk(path.Join(p, k), n.children[k])
		}
	}
	walk("/", root)
}

// writeInodeMap records the path each inode number was given for (names
// are length-prefixed bytes: any byte may appear in them).
func writeInodeMap(dir string, root *inode) error {
	var buf bytes.Buffer
	seen := make(map[*inode]bool)
	walkNames(root, func(p string, n *inode) {
		if seen[n] {
			return
		}
		seen[n] = true
		buf.Write(binary.AppendUvarint(nil, n.ino))
		buf.Write(binary.AppendUvarint(nil, uint64(len(p))))
		buf.WriteString(p)
	})
	if err := continuity.AtomicWriteFile(filepath.Join(dir, inodeMapFile), buf.Bytes(), 0o600); err != nil {
		return fmt.Errorf("writing the inode map: %w", err)
	}
	return nil
}

// renumber gives root's inodes the numbers of the inode map in dir.
func renumber(dir string, root *inode) error {
	b, err := os.ReadFile(filepath.Join(dir, inodeMapFile))
	if err != nil {
		return fmt.Errorf("reading the inode map: %w", err)
	}
	known := make(map[string]uint64)
	var highest uint64
	for len(b) > 0 {
		ino, n := binary.Uvarint(b)
		if n <= 0 {
			return errors.New("inode map: corrupt")
		}
		b = b[n:]
		l, n := binary.Uvarint(b)
		if n <= 0 || uint64(len(b)-n) < l {
			return errors.New("inode map: corrupt")
		}
		known[string(b[n:n+int(l)])] = ino
		b = b[n+int(l):]
		highest = max(highest, ino)
	}
	// Decide each inode by the first of its names the map knows.
	decided := make(map[*inode]uint64)
	used := make(map[uint64]bool)
	var order []*inode
	listed := make(map[*inode]bool)
	walkNames(root, func(p string, n *inode) {
		if _, ok := decided[n]; ok {
			return
		}
		if !listed[n] {
			listed[n] = true
			order = append(order, n)
		}
		if ino, ok := known[p]; ok && !used[ino] {
			decided[n] = ino
			used[ino] = true
		}
	})
	next := highest + 1
	changed := 0
	for _, n := range order {
		ino, ok := decided[n]
		if !ok {
			ino = next
			next++
		}
		if n.ino != ino {
			changed++
		}
		n.ino = ino
	}
	if changed > 0 {
		log.L.WithField("inodes", changed).Warn("the layer's tree is numbered otherwise by this version of the worker; " +
			"kept the numbers the kernel knows")
	}
	return nil
}
