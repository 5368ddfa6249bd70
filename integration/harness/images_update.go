package harness

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strings"
)

// dataSize is the size of generated data file i: 100 to 300 KiB, spread
// so that files of one layer differ in size.
func dataSize(i int) int64 { return int64(100+(i*53)%201) << 10 }

// UpdatePair is an application image in two versions, as a rebuild
// produces them: V2 sits on a modified base, so every layer digest
// differs, while most file contents are identical.
type UpdatePair struct {
	V1, V2 ImageSpec
	// Changed lists the paths whose content differs in V2.
	Changed []string
}

// UpdateImages returns an image of about 100 files and 21 MB (busybox, 40
// incompressible base files, 55 incompressible application files) and its
// next version, in which about 5% of the content bytes changed:
//
//   - base layer: /etc/base-release and one data file changed, and the
//     mode of /usr/share/base changed (metadata only);
//   - application layer, rebuilt: /app/VERSION and four data files changed.
func UpdateImages(nameV1, nameV2 string) UpdatePair {
	const baseFiles, appFiles = 40, 55
	changedBase := map[int]bool{7: true}
	changedApp := map[int]bool{13: true, 29: true, 41: true, 50: true}
	build := func(name string, v int) ImageSpec {
		dirMode := int64(0o755)
		if v == 2 {
			dirMode = 0o775
		}
		base := append(BusyboxLayer(),
			Entry{Name: "/etc/base-release", Content: []byte(fmt.Sprintf("base release 1.%d\n", v-1))},
			Entry{Name: "/usr/share/base", Type: tar.TypeDir, Mode: dirMode},
		)
		for i := 0; i < baseFiles; i++ {
			seed := uint64(1000 + i)
			if v == 2 && changedBase[i] {
				seed += 1 << 20
			}
			base = append(base, Entry{Name: fmt.Sprintf("/usr/share/base/f%03d", i), RandomSize: dataSize(i), RandomSeed: seed})
		}
		app := Layer{
			{Name: "/app", Type: tar.TypeDir},
			{Name: "/app/VERSION", Content: []byte(fmt.Sprintf("app version %d\n", v))},
		}
		for i := 0; i < appFiles; i++ {
			seed := uint64(2000 + i)
			if v == 2 && changedApp[i] {
				seed += 1 << 20
			}
			app = append(app, Entry{Name: fmt.Sprintf("/app/data/d%03d", i), RandomSize: dataSize(i + 3), RandomSeed: seed})
		}
		return ImageSpec{Name: name, Layers: []Layer{base, app}, Cmd: []string{"cat", "/app/VERSION"}}
	}
	p := UpdatePair{V1: build(nameV1, 1), V2: build(nameV2, 2)}
	p.Changed = []string{"/etc/base-release", "/app/VERSION"}
	for i := 0; i < baseFiles; i++ {
		if changedBase[i] {
			p.Changed = append(p.Changed, fmt.Sprintf("/usr/share/base/f%03d", i))
		}
	}
	for i := 0; i < appFiles; i++ {
		if changedApp[i] {
			p.Changed = append(p.Changed, fmt.Sprintf("/app/data/d%03d", i))
		}
	}
	return p
}

// ContentBytes returns the bytes of regular file content in the merged
// image (the topmost entry of each path; whiteouts are not applied) and,
// of those, the bytes of the given paths.
func (s ImageSpec) ContentBytes(paths []string) (total, of int64) {
	want := map[string]bool{}
	for _, p := range paths {
		want[p] = true
	}
	seen := map[string]bool{}
	for i := len(s.Layers) - 1; i >= 0; i-- {
		for _, e := range s.Layers[i] {
			if seen[e.Name] || (e.Type != 0 && e.Type != tar.TypeReg) {
				continue
			}
			seen[e.Name] = true
			n := e.RandomSize + int64(len(e.Content))
			if e.HostFile != "" {
				if st, err := os.Stat(e.HostFile); err == nil {
					n = st.Size()
				}
			}
			total += n
			if want[e.Name] {
				of += n
			}
		}
	}
	return total, of
}

// copyTo writes the content of a regular file entry to w.
func (e Entry) copyTo(w io.Writer) error {
	switch {
	case e.HostFile != "":
		f, err := os.Open(e.HostFile)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(w, f)
		return err
	case e.RandomSize > 0:
		_, err := io.Copy(w, RandomReader(e.RandomSeed, e.RandomSize))
		return err
	default:
		_, err := w.Write(e.Content)
		return err
	}
}

// ConcatSHA256 returns the hex sha256 of the contents of paths (as the
// merged image holds them) concatenated: what `cat PATHS | sha256sum`
// prints in a container of s.
func (s ImageSpec) ConcatSHA256(paths ...string) (string, error) {
	h := sha256.New()
	for _, p := range paths {
		e, ok := s.Lookup(p)
		if !ok {
			return "", fmt.Errorf("%s: not in image %s", p, s.Name)
		}
		if err := e.copyTo(h); err != nil {
			return "", fmt.Errorf("%s: %w", p, err)
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// ScatteredImage returns an image of n incompressible files of 100 to 300
// KiB (n/3 per layer under /srv/l0, /srv/l1, /srv/l2; busybox in the base
// layer) whose command reads six of them, from every layer, late in each
// layer's TOC and in an order that is neither layer nor TOC order, and
// prints the sha256 of what it read. It returns the image and the six
// paths in the order the command reads them.
func ScatteredImage(name string, n int) (ImageSpec, []string) {
	per := n / 3
	layers := make([]Layer, 3)
	layers[0] = BusyboxLayer()
	for l := range layers {
		count := per
		if l == 2 {
			count = n - 2*per
		}
		for i := 0; i < count; i++ {
			layers[l] = append(layers[l], Entry{
				Name:       fmt.Sprintf("/srv/l%d/f%03d", l, i),
				RandomSize: dataSize(i + 17*l),
				RandomSeed: uint64(10000*(l+1) + i),
			})
		}
	}
	at := func(l, back int) string { return fmt.Sprintf("/srv/l%d/f%03d", l, per-1-back) }
	reads := []string{at(2, 2), at(0, 1), at(1, 0), at(2, 7), at(0, 4), at(1, 11)}
	cmd := "cat " + strings.Join(reads, " ") + " | sha256sum"
	return ImageSpec{Name: name, Layers: layers, Cmd: []string{"/bin/sh", "-c", cmd}}, reads
}
