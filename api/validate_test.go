package api

import (
	"math"
	"strings"
	"testing"
)

func TestValidateName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"etc/passwd", true},
		{"a", true},
		{".wh..wh..opq", true},
		{"dir/.wh.file", true},
		{"..a/b..", true},
		{"", false},
		{".", false},
		{"/etc/passwd", false},
		{"../etc", false},
		{"a/../../b", false},
		{"a/./b", false},
		{"a//b", false},
		{"a/", false},
		{"a\x00b", false},
	} {
		if err := ValidateName(tc.name); (err == nil) != tc.ok {
			t.Errorf("ValidateName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}

func TestParseDigest(t *testing.T) {
	hex := strings.Repeat("ab", 32)
	for _, tc := range []struct {
		in string
		ok bool
	}{
		{"sha256:" + hex, true},
		{"sha256:" + strings.ToUpper(hex), false},
		{"sha256:" + hex[:63], false},
		{"sha256:../../" + hex[6:], false},
		{"sha512:" + hex + hex, false},
		{hex, false},
		{"", false},
	} {
		if _, err := ParseDigest(tc.in); (err == nil) != tc.ok {
			t.Errorf("ParseDigest(%q) = %v, want ok=%v", tc.in, err, tc.ok)
		}
	}
}

func TestEntryValidate(t *testing.T) {
	d := "sha256:" + strings.Repeat("0", 64)
	for _, tc := range []struct {
		name string
		e    Entry
		ok   bool
	}{
		{"dir", Entry{Name: "d", Type: TypeDir}, true},
		{"empty file", Entry{Name: "f", Type: TypeReg}, true},
		{"file", Entry{Name: "f", Type: TypeReg, Size: 3, Digest: d, Chunks: []Chunk{{Size: 3, Digest: d}}}, true},
		{"chunks short", Entry{Name: "f", Type: TypeReg, Size: 4, Digest: d, Chunks: []Chunk{{Size: 3, Digest: d}}}, false},
		{"chunks gap", Entry{Name: "f", Type: TypeReg, Size: 6, Digest: d, Chunks: []Chunk{{Size: 3, Digest: d}, {Offset: 4, Size: 2, Digest: d}}}, false},
		{"empty with content", Entry{Name: "f", Type: TypeReg, Digest: d}, false},
		{"no digest", Entry{Name: "f", Type: TypeReg, Size: 3}, false},
		{"hardlink escape", Entry{Name: "l", Type: TypeHardlink, LinkName: "../x"}, false},
		{"symlink absolute", Entry{Name: "l", Type: TypeSymlink, LinkName: "/etc/passwd"}, true},
		{"symlink empty", Entry{Name: "l", Type: TypeSymlink}, false},
		{"unknown type", Entry{Name: "s", Type: "socket"}, false},
		// Sizes that would wrap around int64 to the file's size.
		{"chunks wrap around", Entry{Name: "f", Type: TypeReg, Size: 3, Digest: d, Chunks: []Chunk{
			{Size: math.MaxInt64, Digest: d}, {Offset: math.MaxInt64, Size: math.MaxInt64, Digest: d}, {Offset: -2, Size: 5, Digest: d}}}, false},
		{"compressed extent wraps around", Entry{Name: "f", Type: TypeReg, Size: 3, Digest: d, Chunks: []Chunk{
			{Size: 3, Digest: d, CompressedOffset: math.MaxInt64 - 1, CompressedSize: 2}}}, false},
		{"directory with content", Entry{Name: "d", Type: TypeDir, Digest: d}, false},
		{"symlink with chunks", Entry{Name: "l", Type: TypeSymlink, LinkName: "x", Chunks: []Chunk{{Size: 3, Digest: d}}}, false},
		{"hard link with a size", Entry{Name: "l", Type: TypeHardlink, LinkName: "f", Size: 3}, false},
	} {
		if err := tc.e.Validate(); (err == nil) != tc.ok {
			t.Errorf("%s: Validate() = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}
