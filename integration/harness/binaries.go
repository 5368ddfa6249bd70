package harness

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
)

// Names of the Starlight binaries, as `make build` puts them in bin/.
const (
	RegistryBinary = "starlight-registry"
	WorkerBinary   = "starlight-worker"
	CLIBinary      = "ctr-starlight"
)

var binaries struct {
	once sync.Once
	dir  string
	err  error
}

// Binaries returns the directory holding the three Starlight binaries:
// $STARLIGHT_BIN when set (the Makefile sets it after `make build`),
// otherwise a temporary directory they are built into once per process.
func Binaries(t T) string {
	t.Helper()
	binaries.once.Do(func() {
		if dir := os.Getenv("STARLIGHT_BIN"); dir != "" {
			binaries.dir, binaries.err = filepath.Abs(dir)
			return
		}
		binaries.dir, binaries.err = buildBinaries()
	})
	if binaries.err != nil {
		t.Fatalf("starlight binaries: %v", binaries.err)
	}
	for _, b := range []string{RegistryBinary, WorkerBinary, CLIBinary} {
		if _, err := os.Stat(filepath.Join(binaries.dir, b)); err != nil {
			t.Fatalf("starlight binaries: %v (run `make build` or unset STARLIGHT_BIN)", err)
		}
	}
	return binaries.dir
}

// RepoRoot is the root of the Starlight module, found from this file.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

func buildBinaries() (string, error) {
	dir, err := os.MkdirTemp("", "starlight-bin-")
	if err != nil {
		return "", err
	}
	shared.Cleanup(func() { os.RemoveAll(dir) })
	cmd := exec.Command("go", "build", "-o", dir+"/",
		"./registry-ext/cmd/starlight-registry",
		"./worker/cmd/starlight-worker",
		"./worker/cmd/ctr-starlight")
	cmd.Dir = RepoRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build: %w\n%s", err, out)
	}
	return dir, nil
}
