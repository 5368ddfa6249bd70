package bench

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/starlight-project/starlight/integration/harness"
)

// Machine describes the machine and the software versions of a run.
func Machine() string {
	var b strings.Builder
	line := func(k, v string) { fmt.Fprintf(&b, "%-12s %s\n", k+":", strings.TrimSpace(v)) }
	cmd := func(name string, args ...string) string {
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			return "unavailable (" + err.Error() + ")"
		}
		return strings.SplitN(strings.TrimSpace(string(out)), "\n", 2)[0]
	}
	line("cpus", fmt.Sprintf("%d (%s)", runtime.NumCPU(), cpuModel()))
	line("memory", memTotal())
	line("kernel", cmd("uname", "-srm"))
	if v, err := os.ReadFile("/etc/debian_version"); err == nil {
		line("debian", string(v))
	}
	line("go", runtime.Version())
	line("containerd", cmd(harness.ContainerdBinary, "--version"))
	line("runc", cmd("runc", "--version"))
	line("docker", cmd(harness.DockerBinary, "--version"))
	if dir := os.Getenv("STARGZ_BIN"); dir != "" {
		line("stargz", cmd(filepath.Join(dir, harness.StargzBinary), "-version"))
		if v, err := os.ReadFile(filepath.Join(dir, harness.CtrRemoteBinary+".version")); err == nil {
			line("ctr-remote", string(v))
		}
	}
	line("starlight", gitDescribe())
	return b.String()
}

func cpuModel() string {
	data, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(l, "model name") {
			if i := strings.IndexByte(l, ':'); i >= 0 {
				return strings.TrimSpace(l[i+1:])
			}
		}
	}
	return "unknown model"
}

func memTotal() string {
	data, _ := os.ReadFile("/proc/meminfo")
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(l, "MemTotal:") {
			var kb int64
			fmt.Sscanf(strings.TrimSpace(strings.TrimPrefix(l, "MemTotal:")), "%d", &kb)
			return fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20))
		}
	}
	return "unknown"
}

func gitDescribe() string {
	c := exec.Command("git", "describe", "--always", "--dirty")
	c.Dir = harness.RepoRoot()
	var out bytes.Buffer
	c.Stdout = &out
	if err := c.Run(); err != nil {
		return "unknown"
	}
	return out.String()
}
