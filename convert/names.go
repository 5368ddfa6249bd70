package convert

import (
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/starlight-project/starlight/api"
)

// A tar name is bytes, and a layer may hold names that are not valid
// UTF-8. eStargz's TOC is JSON, whose encoder replaces every invalid byte
// with U+FFFD, so the TOC of such a layer names those entries differently
// from its tar (and from containerd's unpacking of it). Conversion reads the
// names from the tar instead: rawNames remembers, for each name and symlink
// target that is not UTF-8, its form in the TOC.

// jsonText returns s as encoding/json writes it: each byte that is not
// part of valid UTF-8 becomes U+FFFD.
func jsonText(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && n == 1 {
			b.WriteRune(utf8.RuneError)
		} else {
			b.WriteString(s[i : i+n])
		}
		i += n
	}
	return b.String()
}

// rawNames maps the TOC form of names (clean paths) and symlink targets
// that are not UTF-8 back to their bytes.
type rawNames struct {
	names, targets map[string]string
	// clash is set when a TOC form stands for two different names (two
	// names differing only in invalid bytes, or one of them valid).
	clash string
	// replaced holds the valid names containing U+FFFD, which a TOC form
	// could be mistaken for.
	replaced map[string]bool
}

func (r *rawNames) addName(name string) {
	if utf8.ValidString(name) {
		if strings.ContainsRune(name, utf8.RuneError) {
			if r.replaced == nil {
				r.replaced = map[string]bool{}
			}
			r.replaced[name] = true
			if _, ok := r.names[name]; ok {
				r.clash = name
			}
		}
		return
	}
	if r.names == nil {
		r.names = map[string]string{}
	}
	k := jsonText(name)
	if old, ok := r.names[k]; (ok && old != name) || r.replaced[k] {
		r.clash = name
	}
	r.names[k] = name
}

func (r *rawNames) addTarget(target string) {
	if utf8.ValidString(target) {
		return
	}
	if r.targets == nil {
		r.targets = map[string]string{}
	}
	k := jsonText(target)
	if old, ok := r.targets[k]; ok && old != target {
		r.clash = target
	}
	r.targets[k] = target
}

// err reports names an eStargz TOC cannot tell apart.
func (r *rawNames) err() error {
	if r.clash != "" {
		return invalid(fmt.Errorf("layer: name %q is not valid UTF-8 and cannot be told apart from another one in an eStargz TOC", r.clash))
	}
	return nil
}

// restore gives the entries read from the TOC their names from the tar.
func (r *rawNames) restore(entries []api.Entry) error {
	if err := r.err(); err != nil {
		return err
	}
	if len(r.names) == 0 && len(r.targets) == 0 {
		return nil
	}
	for i := range entries {
		e := &entries[i]
		if raw, ok := r.names[e.Name]; ok {
			e.Name = raw
		}
		switch e.Type {
		case api.TypeHardlink:
			if raw, ok := r.names[e.LinkName]; ok {
				e.LinkName = raw
			}
		case api.TypeSymlink:
			if raw, ok := r.targets[e.LinkName]; ok {
				e.LinkName = raw
			}
		}
	}
	return nil
}
