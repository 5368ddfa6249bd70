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

// Names of containerd 2's tools, as Containerd2Binaries builds them.
const (
	Containerd2Binary = "containerd"
	Shim2Binary       = "containerd-shim-runc-v2"
	Ctr2Binary        = "ctr"
)

// containerd2Module is the nested module that pins containerd 2 and lists
// its three tools (`tool` directives), relative to RepoRoot.
const containerd2Module = "integration/containerd2"

var containerd2Binaries struct {
	once sync.Once
	dir  string
	err  error
}

// Containerd2Binaries returns the directory holding containerd 2's
// containerd, containerd-shim-runc-v2 and ctr: $STARLIGHT_CONTAINERD2_BIN
// when set, otherwise a temporary directory they are built into, from the
// module integration/containerd2, once per process. The Go build cache
// keeps the build: after the first run it costs the links only.
func Containerd2Binaries(t T) string {
	t.Helper()
	containerd2Binaries.once.Do(func() {
		if dir := os.Getenv("STARLIGHT_CONTAINERD2_BIN"); dir != "" {
			containerd2Binaries.dir, containerd2Binaries.err = filepath.Abs(dir)
			return
		}
		containerd2Binaries.dir, containerd2Binaries.err = buildContainerd2()
	})
	if containerd2Binaries.err != nil {
		t.Fatalf("containerd 2 binaries: %v", containerd2Binaries.err)
	}
	for _, b := range []string{Containerd2Binary, Shim2Binary, Ctr2Binary} {
		if _, err := os.Stat(filepath.Join(containerd2Binaries.dir, b)); err != nil {
			t.Fatalf("containerd 2 binaries: %v (unset STARLIGHT_CONTAINERD2_BIN to have them built from %s)", err, containerd2Module)
		}
	}
	return containerd2Binaries.dir
}

func buildContainerd2() (string, error) {
	dir, err := os.MkdirTemp("", "starlight-containerd2-")
	if err != nil {
		return "", err
	}
	shared.Cleanup(func() { os.RemoveAll(dir) })
	// `tool` is every tool the module's go.mod lists. no_btrfs: the
	// btrfs snapshotter needs the btrfs headers and the tests disable it.
	cmd := exec.Command("go", "build", "-tags", "no_btrfs", "-o", dir+"/", "tool")
	cmd.Dir = filepath.Join(RepoRoot(), containerd2Module)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build in %s: %w\n%s", containerd2Module, err, out)
	}
	return dir, nil
}
