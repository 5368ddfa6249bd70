package main

import (
	"bytes"
	"regexp"
	"testing"

	"github.com/distribution/distribution/v3/registry"

	"github.com/starlight-project/starlight/api/version"
)

func TestVersionFlag(t *testing.T) {
	defer func(v, c string) { version.Version, version.Commit = v, c }(version.Version, version.Commit)
	version.Version, version.Commit = "v1.2.3-4-gabcdef", "abcdef0123"
	cmd := registry.RootCmd
	wrapVersion(cmd)
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetArgs([]string{"--version"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	// A test binary records no dependency versions: distribution's own
	// version string stands in.
	want := regexp.MustCompile(`^starlight-registry version v1\.2\.3-4-gabcdef \(commit abcdef0123\)\ndistribution v3\.\S+\n$`)
	if !want.MatchString(out.String()) {
		t.Errorf("--version printed %q, want %s", out.String(), want)
	}
}
