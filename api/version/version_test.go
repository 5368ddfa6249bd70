package version

import (
	"runtime/debug"
	"testing"
)

func TestGet(t *testing.T) {
	vcs := func(rev, modified string) func() (*debug.BuildInfo, bool) {
		return func() (*debug.BuildInfo, bool) {
			return &debug.BuildInfo{
				Main:     debug.Module{Path: "github.com/starlight-project/starlight", Version: "v0.0.0-20260101000000-0123456789ab"},
				Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: modified}},
			}, true
		}
	}
	none := func() (*debug.BuildInfo, bool) { return nil, false }
	for _, tc := range []struct {
		name     string
		v, c     string
		bi       func() (*debug.BuildInfo, bool)
		wantLine string
	}{
		{"set at build time", "v1.2-3-gabc", "abcdef", vcs("ffff", "false"), "v1.2-3-gabc (commit abcdef)"},
		{"from the build info", "", "", vcs("0123456789abcdef", "false"), "v0.0.0-20260101000000-0123456789ab (commit 0123456789abcdef)"},
		{"modified tree", "", "", vcs("0123", "true"), "v0.0.0-20260101000000-0123456789ab (commit 0123-dirty)"},
		{"version set, commit from the build info", "v1", "", vcs("0123", "false"), "v1 (commit 0123)"},
		{"nothing", "", "", none, "(devel) (commit unknown)"},
	} {
		if got := get(tc.v, tc.c, tc.bi).String(); got != tc.wantLine {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.wantLine)
		}
	}
}

func TestModule(t *testing.T) {
	bi := func() (*debug.BuildInfo, bool) {
		return &debug.BuildInfo{Deps: []*debug.Module{
			{Path: "github.com/distribution/distribution/v3", Version: "v3.1.2"},
			{Path: "example.com/replaced", Version: "v1.0.0", Replace: &debug.Module{Path: "../fork", Version: "v1.0.1"}},
		}}, true
	}
	for path, want := range map[string]string{
		"github.com/distribution/distribution/v3": "v3.1.2",
		"example.com/replaced":                    "v1.0.1",
		"example.com/absent":                      "",
	} {
		if got := module(path, bi); got != want {
			t.Errorf("module(%s) = %q, want %q", path, got, want)
		}
	}
}

func TestLine(t *testing.T) {
	defer func(v, c string) { Version, Commit = v, c }(Version, Commit)
	Version, Commit = "v9", "c0ffee"
	if got, want := Line("ctr-starlight"), "ctr-starlight version v9 (commit c0ffee)"; got != want {
		t.Errorf("Line: %q, want %q", got, want)
	}
}
