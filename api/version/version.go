// Package version is the version of the Starlight binaries, set at build
// time by `make build`:
//
//	go build -ldflags "-X github.com/starlight-project/starlight/api/version.Version=$(git describe --always --dirty) \
//	    -X github.com/starlight-project/starlight/api/version.Commit=$(git rev-parse HEAD)"
//
// Without them (go build, go install, go test) Get falls back to what the
// Go toolchain recorded in the binary: the main module's version and the
// VCS revision.
package version

import (
	"fmt"
	"runtime/debug"
)

// Version and Commit are set with -ldflags -X; see the package comment.
var (
	Version = ""
	Commit  = ""
)

// Info is the version of a binary.
type Info struct {
	Version string
	Commit  string
}

// Get returns the version and commit set at build time, or else those the
// Go toolchain recorded ("(devel)" and "unknown" when there is neither).
func Get() Info {
	return get(Version, Commit, debug.ReadBuildInfo)
}

func get(v, c string, readBuildInfo func() (*debug.BuildInfo, bool)) Info {
	info := Info{Version: v, Commit: c}
	if info.Version != "" && info.Commit != "" {
		return info
	}
	if bi, ok := readBuildInfo(); ok {
		if info.Version == "" && bi.Main.Version != "" {
			info.Version = bi.Main.Version
		}
		if info.Commit == "" {
			var rev, modified string
			for _, s := range bi.Settings {
				switch s.Key {
				case "vcs.revision":
					rev = s.Value
				case "vcs.modified":
					modified = s.Value
				}
			}
			if rev != "" && modified == "true" {
				rev += "-dirty"
			}
			info.Commit = rev
		}
	}
	if info.Version == "" {
		info.Version = "(devel)"
	}
	if info.Commit == "" {
		info.Commit = "unknown"
	}
	return info
}

// String is "VERSION (commit COMMIT)".
func (i Info) String() string {
	return fmt.Sprintf("%s (commit %s)", i.Version, i.Commit)
}

// Line is what `NAME --version` prints: "NAME version VERSION (commit COMMIT)".
func Line(name string) string {
	return name + " version " + Get().String()
}

// Module returns the version of the module path linked into the binary
// (e.g. "v3.1.2" for github.com/distribution/distribution/v3), "" when
// the binary does not record it.
func Module(path string) string {
	return module(path, debug.ReadBuildInfo)
}

func module(path string, readBuildInfo func() (*debug.BuildInfo, bool)) string {
	bi, ok := readBuildInfo()
	if !ok {
		return ""
	}
	for _, d := range bi.Deps {
		if d.Path == path {
			if d.Replace != nil && d.Replace.Version != "" {
				return d.Replace.Version
			}
			return d.Version
		}
	}
	return ""
}
