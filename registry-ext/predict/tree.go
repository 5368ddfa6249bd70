package predict

import (
	"errors"
	"path"
	"strings"

	"github.com/starlight-project/starlight/api"
)

// Path resolution bounds, as the kernel's: symlinks followed in one
// lookup (MAXSYMLINKS) and the length of a path or link target
// (PATH_MAX). steps bounds the components one lookup walks, however the
// links expand.
const (
	maxLinks    = 40
	maxPathLen  = 4096
	maxLinkHops = 8 // hard link chains inside one layer
	maxSteps    = 4 * maxPathLen
)

var (
	errNotFound = errors.New("no such file")
	errLoop     = errors.New("too many levels of symbolic links")
)

// node is an entry of the merged view: entry idx of layer layer.
type node struct {
	layer, idx int
}

// tree is the merged view of an image's layers, as overlayfs shows it to
// a container: the topmost entry of every path wins, a whiteout
// (".wh.NAME") hides NAME and everything under it in the layers below,
// an opaque directory (".wh..wh..opq") hides what the layers below hold
// under it, and a non-directory hides the lower layers' entries under
// its path.
type tree struct {
	layers []api.LayerTree
	vis    map[string]node
	names  []map[string]int // per layer: entry name → index, for hard links
}

func newTree(layers []api.LayerTree) *tree {
	t := &tree{layers: layers, vis: map[string]node{}, names: make([]map[string]int, len(layers))}
	masked := map[string]bool{} // whited out: the path and everything under it
	opaque := map[string]bool{} // opaque: everything under it ("" is the root)
	hidden := func(name string) bool {
		if masked[name] {
			return true
		}
		for a := parent(name); ; a = parent(a) {
			if opaque[a] {
				return true
			}
			if a == "" {
				return false
			}
			if masked[a] {
				return true
			}
			if n, ok := t.vis[a]; ok && t.entry(n).Type != api.TypeDir {
				return true
			}
		}
	}
	for li := len(layers) - 1; li >= 0; li-- {
		entries := layers[li].Entries
		names := make(map[string]int, len(entries))
		var wh, opq []string
		for i := range entries {
			e := &entries[i]
			names[e.Name] = i
			dir, base := path.Split(e.Name)
			switch {
			case base == api.WhiteoutOpaque:
				opq = append(opq, strings.TrimSuffix(dir, "/"))
				continue
			case strings.HasPrefix(base, api.WhiteoutPrefix):
				wh = append(wh, dir+strings.TrimPrefix(base, api.WhiteoutPrefix))
				continue
			}
			if _, above := t.vis[e.Name]; above || hidden(e.Name) {
				continue
			}
			t.vis[e.Name] = node{li, i}
		}
		t.names[li] = names
		// A layer's whiteouts hide the layers below it, not its own entries.
		for _, p := range wh {
			masked[p] = true
		}
		for _, p := range opq {
			opaque[p] = true
		}
	}
	return t
}

func (t *tree) entry(n node) *api.Entry { return &t.layers[n.layer].Entries[n.idx] }

// parent returns the directory of a clean relative name, "" for the root.
func parent(name string) string {
	if i := strings.LastIndexByte(name, '/'); i >= 0 {
		return name[:i]
	}
	return ""
}

// lookup resolves p (absolute, or relative to the image root) in the
// merged view, following symlinks in every component and, when follow,
// in the last: an absolute link target restarts at the image root, ".."
// stops at it, so a resolution never leaves the tree. It returns the name
// of the entry found.
func (t *tree) lookup(p string, follow bool) (string, node, error) {
	if len(p) > maxPathLen {
		return "", node{}, errNotFound
	}
	comps := strings.Split(p, "/")
	cur := "" // resolved directory; "" is the root
	links, steps := 0, 0
	for len(comps) > 0 {
		if steps++; steps > maxSteps {
			return "", node{}, errLoop
		}
		c := comps[0]
		comps = comps[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			cur = parent(cur)
			continue
		}
		next := c
		if cur != "" {
			next = cur + "/" + c
		}
		n, ok := t.vis[next]
		if !ok {
			if len(comps) == 0 {
				return "", node{}, errNotFound
			}
			// Parent directories need not be listed in a layer.
			cur = next
			continue
		}
		e := t.entry(n)
		if e.Type == api.TypeSymlink && (len(comps) > 0 || follow) {
			if links++; links > maxLinks {
				return "", node{}, errLoop
			}
			if len(e.LinkName) > maxPathLen || e.LinkName == "" {
				return "", node{}, errNotFound
			}
			if strings.HasPrefix(e.LinkName, "/") {
				cur = ""
			}
			comps = append(strings.Split(e.LinkName, "/"), comps...)
			continue
		}
		if len(comps) == 0 {
			return next, n, nil
		}
		if e.Type != api.TypeDir {
			return "", node{}, errNotFound // not a directory
		}
		cur = next
	}
	if n, ok := t.vis[cur]; ok {
		return cur, n, nil
	}
	return "", node{}, errNotFound
}

// file is a regular file of the merged view.
type file struct {
	name    string // the path resolved to: the entry's name
	layer   int
	entry   *api.Entry // the named entry (possibly a hard link)
	content *api.Entry // the entry holding the content (the hard link's target)
}

// open resolves p to a regular file, through symlinks and hard links.
func (t *tree) open(p string) (*file, error) {
	name, n, err := t.lookup(p, true)
	if err != nil {
		return nil, err
	}
	e := t.entry(n)
	c := e
	for hops := 0; c.Type == api.TypeHardlink; hops++ {
		i, ok := t.names[n.layer][c.LinkName]
		if !ok || hops >= maxLinkHops {
			return nil, errNotFound
		}
		c = &t.layers[n.layer].Entries[i]
	}
	if c.Type != api.TypeReg {
		return nil, errNotFound
	}
	return &file{name: name, layer: n.layer, entry: e, content: c}, nil
}
