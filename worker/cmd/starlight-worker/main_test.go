package main

import (
	"bytes"
	"testing"

	"github.com/starlight-project/starlight/api/version"
)

func TestVersionFlag(t *testing.T) {
	defer func(v, c string) { version.Version, version.Commit = v, c }(version.Version, version.Commit)
	version.Version, version.Commit = "v1.2.3-4-gabcdef", "abcdef0123"
	cmd := newCommand()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetArgs([]string{"--version"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	if got, want := out.String(), "starlight-worker version v1.2.3-4-gabcdef (commit abcdef0123)\n"; got != want {
		t.Errorf("--version printed %q, want %q", got, want)
	}
}
