package convert

import (
	"archive/tar"
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"
)

// A layer may name a path more than once. containerd's applier handles the
// entries in order: a directory over a directory changes its metadata and
// adds its xattrs, anything else removes what was there (with everything
// below it) and takes its place, and once the layer is applied the mtime of
// every directory entry is set again on whatever is at its path then.
// estargz keeps only the last entry of a name and moves it to the end of
// the layer, which loses the first entry's xattrs and the directory mtime,
// and changes the order. So a layer with duplicate names is rewritten first
// into one with a single entry per name that unpacks to the same tree.

// normalizeTar returns src rewritten without duplicate names, in a
// temporary file of dir, or nil if src has none.
func normalizeTar(src *os.File, size int64, dir string) (_ *os.File, _ int64, retErr error) {
	plan, err := planNormalize(io.NewSectionReader(src, 0, size))
	if err != nil || plan == nil {
		return nil, 0, err
	}
	out, err := os.CreateTemp(dir, "starlight-tar-*")
	if err != nil {
		return nil, 0, fmt.Errorf("creating temporary file: %w", err)
	}
	defer func() {
		if retErr != nil {
			removeTemp(out)
		}
	}()
	cw := &countWriter{}
	bw := bufio.NewWriterSize(io.MultiWriter(out, cw), 1<<20)
	tw := tar.NewWriter(bw)
	tr := tar.NewReader(io.NewSectionReader(src, 0, size))
	for i := 0; ; i++ {
		if _, err := tr.Next(); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, 0, fmt.Errorf("rewriting layer: %w", err)
		}
		h := plan[i]
		if h == nil {
			continue
		}
		// The reader fills the deprecated Xattrs from PAXRecords, and
		// the writer would let it override the PAXRecords the plan
		// changed.
		//lint:ignore SA1019 clearing the deprecated copy, PAXRecords has every xattr
		h.Xattrs = nil
		if err := tw.WriteHeader(h); err != nil {
			return nil, 0, fmt.Errorf("rewriting layer: entry %q: %w", h.Name, err)
		}
		if _, err := io.Copy(tw, tr); err != nil {
			return nil, 0, fmt.Errorf("rewriting layer: entry %q: %w", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, 0, err
	}
	if err := bw.Flush(); err != nil {
		return nil, 0, err
	}
	return out, cw.n, nil
}

// planNormalize returns, for every entry of the tar in order, the header to
// write in its place (nil: left out), or nil if no name repeats. The tar
// has been validated (spoolTar).
func planNormalize(r io.Reader) ([]*tar.Header, error) {
	var (
		hdrs     []*tar.Header
		names    []string
		inodes   []int              // entry -> the inode it names (hard links share one)
		cur      = map[string]int{} // name -> index of its current entry
		dirOrder []dirEntry
		dup      bool
	)
	// drop leaves entry k out. A hard link's header has changed its
	// inode, whose other names stay: that effect moves to another header
	// of the inode (keepLinkEffect).
	drop := func(k int) {
		if hdrs[k].Typeflag == tar.TypeLink {
			keepLinkEffect(hdrs, inodes, k)
		}
		hdrs[k] = nil
	}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		name, err := cleanTarName(h.Name)
		if err != nil {
			return nil, err
		}
		i := len(hdrs)
		hdrs, names = append(hdrs, h), append(names, name)
		inode := i
		if h.Typeflag == tar.TypeLink {
			if t, err := cleanTarName(h.Linkname); err == nil {
				if ti, ok := cur[t]; ok {
					inode = inodes[ti]
				}
			}
		}
		inodes = append(inodes, inode)
		if h.Typeflag == tar.TypeDir {
			dirOrder = append(dirOrder, dirEntry{name, i, h.ModTime})
		}
		j, seen := cur[name]
		if !seen || name == "" {
			cur[name] = i
			continue
		}
		dup = true
		if hdrs[j].Typeflag == tar.TypeDir && h.Typeflag == tar.TypeDir {
			mergeDirHeader(hdrs[j], h)
			hdrs[i] = nil
			continue
		}
		// Replaced: the applier removes the earlier entry and what this
		// layer put below it.
		drop(j)
		var removed []int
		for k := range hdrs[:i] {
			if hdrs[k] != nil && strings.HasPrefix(names[k], name+"/") {
				removed = append(removed, k)
			}
		}
		inRemoved := map[int]bool{}
		for _, k := range removed {
			inRemoved[k] = true
		}
		for _, k := range removed {
			for l, lh := range hdrs {
				if lh != nil && !inRemoved[l] && lh.Typeflag == tar.TypeLink && inodes[l] == inodes[k] && hdrs[k].Typeflag != tar.TypeLink {
					return nil, invalid(fmt.Errorf("layer: entry %q replaces a directory holding %q, the target of hard link %q", h.Name, names[k], names[l]))
				}
			}
		}
		for _, k := range removed {
			drop(k)
			delete(cur, names[k])
		}
		cur[name] = i
	}
	if !dup {
		return nil, nil
	}
	// The applier sets the mtime of every directory entry again, in
	// order, once the layer is applied: on the inode at its path then,
	// after every header of that inode.
	sort.Slice(dirOrder, func(a, b int) bool { return dirOrder[a].at < dirOrder[b].at })
	for _, d := range dirOrder {
		i, ok := cur[d.name]
		if !ok || hdrs[i] == nil || hdrs[i].Typeflag == tar.TypeDir {
			continue
		}
		last := i
		for n := i + 1; n < len(hdrs); n++ {
			if hdrs[n] != nil && inodes[n] == inodes[i] {
				last = n
			}
		}
		hdrs[last].ModTime = d.mtime
	}
	return hdrs, nil
}

type dirEntry struct {
	name  string
	at    int
	mtime time.Time
}

// mergeDirHeader applies a later header of the same directory (or inode)
// to the first: its metadata, and its xattrs over the first's.
func mergeDirHeader(first, later *tar.Header) {
	first.Mode, first.Uid, first.Gid, first.Uname, first.Gname = later.Mode, later.Uid, later.Gid, later.Uname, later.Gname
	first.ModTime, first.AccessTime, first.ChangeTime = later.ModTime, later.AccessTime, later.ChangeTime
	for k, v := range later.PAXRecords {
		if strings.HasPrefix(k, paxXattr) {
			if first.PAXRecords == nil {
				first.PAXRecords = map[string]string{}
			}
			first.PAXRecords[k] = v
		}
	}
	if len(first.PAXRecords) > 0 {
		first.Format = tar.FormatPAX
	}
}

const paxXattr = "SCHILY.xattr."

// keepLinkEffect moves the effect of hard link k's header on its inode to
// another kept header of that inode. containerd's applier applies a
// link's owner, mode (but to a symlink), xattrs and mtime to the inode;
// later headers override all but the xattrs, which add up. So the xattrs
// go to the next header of the inode, or, if there is none, everything
// goes to the last one before k.
func keepLinkEffect(hdrs []*tar.Header, inodes []int, k int) {
	l := hdrs[k]
	for n := k + 1; n < len(hdrs); n++ {
		if h := hdrs[n]; h != nil && inodes[n] == inodes[k] {
			for key, v := range l.PAXRecords {
				if _, own := h.PAXRecords[key]; strings.HasPrefix(key, paxXattr) && !own {
					if h.PAXRecords == nil {
						h.PAXRecords = map[string]string{}
					}
					h.PAXRecords[key] = v
					h.Format = tar.FormatPAX
				}
			}
			return
		}
	}
	for n := k - 1; n >= 0; n-- {
		if h := hdrs[n]; h != nil && inodes[n] == inodes[k] {
			typ := h.Typeflag
			mergeDirHeader(h, l) // the same fields, for any type
			h.Typeflag = typ
			return
		}
	}
}
