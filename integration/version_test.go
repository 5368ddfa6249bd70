package integration

import (
	"os/exec"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/starlight-project/starlight/integration/harness"
)

// TestVersion runs `--version` of the three binaries: the Starlight
// version and commit (set by make build), and for starlight-registry the
// distribution version too.
func TestVersion(t *testing.T) {
	bin := harness.Binaries(t)
	line := `version \S+ \(commit \S+\)\n`
	for name, want := range map[string]*regexp.Regexp{
		harness.RegistryBinary: regexp.MustCompile(`^` + harness.RegistryBinary + ` ` + line + `distribution v3\.\d+\.\d+\S*\n$`),
		harness.WorkerBinary:   regexp.MustCompile(`^` + harness.WorkerBinary + ` ` + line + `$`),
		harness.CLIBinary:      regexp.MustCompile(`^` + harness.CLIBinary + ` ` + line + `$`),
	} {
		out, err := exec.Command(filepath.Join(bin, name), "--version").CombinedOutput()
		if err != nil || !want.Match(out) {
			t.Errorf("%s --version: %v, %q; want %s", name, err, out, want)
		}
	}
}
