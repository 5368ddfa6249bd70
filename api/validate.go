package api

import (
	"fmt"
	"math"
	"path"
	"strings"

	"github.com/opencontainers/go-digest"
)

// ValidateName reports whether name is a clean, relative path that stays
// inside the layer root: no leading "/", no "." or ".." element, no empty
// element, no NUL byte.
func ValidateName(name string) error {
	if name == "" || name == "." {
		return fmt.Errorf("empty path")
	}
	if strings.IndexByte(name, 0) >= 0 {
		return fmt.Errorf("path %q contains a NUL byte", name)
	}
	if strings.HasPrefix(name, "/") {
		return fmt.Errorf("path %q is absolute", name)
	}
	if path.Clean(name) != name {
		return fmt.Errorf("path %q is not clean", name)
	}
	for _, el := range strings.Split(name, "/") {
		if el == ".." || el == "." || el == "" {
			return fmt.Errorf("path %q escapes the layer root", name)
		}
	}
	return nil
}

// ParseDigest parses a sha256 digest and checks its hex, so that the hex can
// be used as a file name.
func ParseDigest(s string) (digest.Digest, error) {
	d, err := digest.Parse(s)
	if err != nil {
		return "", fmt.Errorf("invalid digest %q: %w", s, err)
	}
	if d.Algorithm() != digest.SHA256 {
		return "", fmt.Errorf("invalid digest %q: only sha256 is accepted", s)
	}
	return d, nil
}

// Validate checks an entry received from an untrusted source (a layer TOC or
// a bundle header): its name and hard link target stay inside the root, its
// type is known, sizes and chunks are consistent and digests are sha256.
// Symlink targets may point anywhere: they are resolved by the container's
// kernel inside the container's root, never by Starlight.
func (e *Entry) Validate() error {
	if err := ValidateName(e.Name); err != nil {
		return err
	}
	switch e.Type {
	case TypeReg:
		if e.Size < 0 {
			return fmt.Errorf("%s: negative size", e.Name)
		}
		if e.Size == 0 {
			if len(e.Chunks) != 0 || e.Digest != "" {
				return fmt.Errorf("%s: empty file with content", e.Name)
			}
			return nil
		}
		if _, err := ParseDigest(e.Digest); err != nil {
			return fmt.Errorf("%s: %w", e.Name, err)
		}
		var next int64
		for i, c := range e.Chunks {
			// Compared against what is left, never summed past the
			// size: huge sizes must not wrap around to a valid total.
			if c.Offset != next || c.Size <= 0 || c.Size > e.Size-next {
				return fmt.Errorf("%s: chunk %d does not continue the file", e.Name, i)
			}
			if _, err := ParseDigest(c.Digest); err != nil {
				return fmt.Errorf("%s: chunk %d: %w", e.Name, i, err)
			}
			if c.CompressedOffset < 0 || c.CompressedSize < 0 || c.CompressedSize > math.MaxInt64-c.CompressedOffset {
				return fmt.Errorf("%s: chunk %d: invalid compressed location %d+%d", e.Name, i, c.CompressedOffset, c.CompressedSize)
			}
			next += c.Size
		}
		if next != e.Size {
			return fmt.Errorf("%s: chunks cover %d of %d bytes", e.Name, next, e.Size)
		}
		return nil
	}
	// Only a regular file has content.
	if e.Size != 0 || e.Digest != "" || len(e.Chunks) != 0 {
		return fmt.Errorf("%s: a %s entry with a size, digest or chunks", e.Name, e.Type)
	}
	switch e.Type {
	case TypeHardlink:
		if err := ValidateName(e.LinkName); err != nil {
			return fmt.Errorf("%s: hard link target: %w", e.Name, err)
		}
	case TypeSymlink:
		if e.LinkName == "" || strings.IndexByte(e.LinkName, 0) >= 0 {
			return fmt.Errorf("%s: invalid symlink target", e.Name)
		}
	case TypeDir, TypeChar, TypeBlock, TypeFifo:
	default:
		return fmt.Errorf("%s: unknown entry type %q", e.Name, e.Type)
	}
	return nil
}
