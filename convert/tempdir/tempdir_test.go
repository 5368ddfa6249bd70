package tempdir

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain lets the test binary act as a process that opens a directory,
// fills it like a conversion in progress, reports its path and waits to be
// killed.
func TestMain(m *testing.M) {
	if root := os.Getenv("TEMPDIR_TEST_CHILD_ROOT"); root != "" {
		d, err := Open(root)
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		for _, name := range []string{"starlight-tar-1", "starlight-estargz-2", "esgzdata3"} {
			if err := os.WriteFile(filepath.Join(d.Path(), name), make([]byte, 4096), 0o600); err != nil {
				fmt.Println("error:", err)
				os.Exit(1)
			}
		}
		fmt.Println(d.Path())
		time.Sleep(time.Hour) // until killed
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// startChild starts a process holding a directory under root and returns
// it with the directory's path.
func startChild(t *testing.T, root string) (*exec.Cmd, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "TEMPDIR_TEST_CHILD_ROOT="+root)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill() //nolint:errcheck // may have been killed already
		cmd.Wait()         //nolint:errcheck
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || strings.HasPrefix(line, "error:") {
		t.Fatalf("child: %q %v", line, err)
	}
	return cmd, strings.TrimSpace(line)
}

func TestOpenClose(t *testing.T) {
	root := filepath.Join(t.TempDir(), "not", "yet")
	d, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(d.Path()) != root || !strings.HasPrefix(filepath.Base(d.Path()), Prefix) {
		t.Errorf("directory %s is not a process directory under %s", d.Path(), root)
	}
	if err := os.WriteFile(filepath.Join(d.Path(), "spool"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A second process directory under the same root (another replica)
	// does not remove a live one.
	d2, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(d.Path(), "spool")); err != nil {
		t.Errorf("opening another directory removed a live one: %v", err)
	}
	for _, x := range []*Dir{d, d2} {
		if err := x.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(x.Path()); !os.IsNotExist(err) {
			t.Errorf("%s still there after Close: %v", x.Path(), err)
		}
	}
	if err := d.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	assertOnly(t, root)
}

// TestStartupRemovesCrashLeftovers kills a process holding a directory
// full of spool files with SIGKILL, as a crashed registry; the next Open
// under the same root removes that directory and leaves a live process's
// directory and unrelated files alone.
func TestStartupRemovesCrashLeftovers(t *testing.T) {
	root := t.TempDir()
	unrelated := filepath.Join(root, "someone-else")
	if err := os.WriteFile(unrelated, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	crashed, crashedDir := startChild(t, root)
	_, liveDir := startChild(t, root)
	if err := crashed.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	crashed.Wait() //nolint:errcheck // killed
	if ents, err := os.ReadDir(crashedDir); err != nil || len(ents) != 3 {
		t.Fatalf("the crashed process left %v (%v), want its 3 spool files", ents, err)
	}

	d, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := os.Stat(crashedDir); !os.IsNotExist(err) {
		t.Errorf("the crashed process's directory %s survived start-up: %v", crashedDir, err)
	}
	if ents, err := os.ReadDir(liveDir); err != nil || len(ents) != 3 {
		t.Errorf("a live process's directory was touched: %v %v", ents, err)
	}
	if _, err := os.Stat(unrelated); err != nil {
		t.Errorf("an unrelated file was removed: %v", err)
	}
	assertOnly(t, root, filepath.Base(unrelated), filepath.Base(liveDir), filepath.Base(d.Path()))
}

// assertOnly fails unless root holds exactly the names given.
func assertOnly(t *testing.T, root string, names ...string) {
	t.Helper()
	ents, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	for _, e := range ents {
		if !want[e.Name()] {
			t.Errorf("%s left under %s", e.Name(), root)
		}
		delete(want, e.Name())
	}
	for n := range want {
		t.Errorf("%s missing under %s", n, root)
	}
}
