package bench

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/starlight-project/starlight/integration/harness"
)

// The eStargz systems: stargz-snapshotter, the lazy-pulling snapshotter
// Starlight is compared with, used as its documentation says. The images
// are converted by its own tool, ctr-remote, from the same pushed v1:
//
//   - estargz: `ctr-remote image optimize --no-optimize --oci`, eStargz
//     with no prioritized files (the snapshotter prefetches nothing);
//   - estargz-opt: `ctr-remote image optimize --oci` running the
//     workload's readiness check: the files it read come first in each
//     layer, behind the prefetch landmark, and are prefetched at mount.
//
// Both go to a registry that converts nothing (the same starlight-registry
// binary with auto-conversion off) and are pulled through the same link as
// every other system, with `ctr-remote image rpull --plain-http` into a
// fresh containerd-stargz-grpc, and run with `ctr run --snapshotter stargz`.

// stargzSnapshotter is the proxy plugin name, as stargz-snapshotter's
// documentation configures it (and ctr-remote rpull's default).
const stargzSnapshotter = "stargz"

// esgzTag is the tag of a workload's v1 converted for system.
func esgzTag(system string) string {
	if system == SysEstargzOpt {
		return "v1-esgzopt"
	}
	return "v1-esgz"
}

func (r *runner) ctrRemote() string { return filepath.Join(r.opts.StargzBin, harness.CtrRemoteBinary) }

// convertEstargz converts w's v1 for the wanted eStargz systems on a
// private containerd that pulls it straight from the fresh registry (off
// the link), and pushes the results to the plain registry. It returns the
// tags by system; those converted before an error are kept.
func (r *runner) convertEstargz(w Workload) (map[string]string, error) {
	tags := map[string]string{}
	env := harness.NewEnv()
	env.Log = func(string, ...any) {}
	defer env.Close()
	err := env.Run(func() {
		c := harness.StartContainerd(env, harness.ContainerdOptions{Namespace: namespace})
		src := r.ref(r.fresh.Addr, w, "v1")
		c.CtrNS(env, namespace, "images", "pull", "--plain-http", src)
		for _, sys := range []string{SysEstargz, SysEstargzOpt} {
			if !r.want[sys] {
				continue
			}
			tag := esgzTag(sys)
			dst := r.ref(r.plain.Addr, w, tag)
			args := []string{"image", "optimize", "--oci"}
			record := filepath.Join(c.Dir, "record-"+tag+".json")
			if sys == SysEstargz {
				args = append(args, "--no-optimize")
			} else {
				entry, _ := json.Marshal(w.Check[:1])
				rest, _ := json.Marshal(append([]string{}, w.Check[1:]...))
				args = append(args, "--entrypoint", string(entry), "--args", string(rest), "--record-out", record)
			}
			args = append(args, src, dst)
			start := time.Now()
			out, err := c.ToolE(r.ctrRemote(), namespace, args...)
			if err != nil {
				env.Fatalf("%v", err)
			}
			what := "no prioritized files"
			if sys == SysEstargzOpt {
				n := recordedFiles(record)
				if n == 0 {
					env.Fatalf("ctr-remote image optimize recorded no file access of the readiness check:\n%s", out)
				}
				what = fmt.Sprintf("%d files prioritized", n)
			}
			c.CtrNS(env, namespace, "images", "push", "--plain-http", dst)
			tags[sys] = tag
			r.logf("converted %s with ctr-remote for %s (%s) and pushed it as %s in %s", src, sys, what, dst, time.Since(start).Round(time.Second))
		}
	})
	return tags, err
}

// recordedFiles counts the distinct files in ctr-remote's --record-out
// log (a JSON object a line, one per recorded access: path, layerIndex).
func recordedFiles(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	files := map[string]bool{}
	for _, l := range strings.Split(string(b), "\n") {
		var e struct {
			Path       string `json:"path"`
			LayerIndex int    `json:"layerIndex"`
		}
		if json.Unmarshal([]byte(l), &e) == nil && e.Path != "" {
			files[fmt.Sprintf("%d/%s", e.LayerIndex, e.Path)] = true
		}
	}
	return len(files)
}

// estargz: fresh containerd-stargz-grpc and containerd, ctr-remote rpull
// of the eStargz image through the link, ctr run --snapshotter stargz.
func (r *runner) estargz(w Workload, ep *endpoint, tag string, run int, system string) Sample {
	return r.measure(Sample{Image: w.Name, Profile: ep.profile.Name, System: system, Run: run}, func(env *harness.Env, s *Sample) {
		dir := harness.ShortTempDir(env, "bsgz-")
		sock := filepath.Join(dir, "sgz.sock")
		c := harness.StartContainerd(env, harness.ContainerdOptions{Namespace: namespace,
			ProxySnapshotters: map[string]string{stargzSnapshotter: sock}})
		harness.StartStargz(env, harness.StargzOptions{Bin: r.opts.StargzBin, Insecure: []string{ep.host},
			Containerd: c, Address: sock})
		ref := r.ref(ep.host, w, tag)
		before := ep.link.Stats().BytesDown
		start := time.Now()
		if out, err := c.ToolE(r.ctrRemote(), namespace, "image", "rpull", "--plain-http", "--snapshotter", stargzSnapshotter, ref); err != nil {
			env.Fatalf("rpull %s: %v\n%s", ref, err, out)
		}
		s.Pull = time.Since(start).Seconds()
		s.Start = ctrRun(env, c, ref, r.containerID(), w.Check, "--snapshotter", stargzSnapshotter).Seconds()
		s.Seconds = time.Since(start).Seconds()
		s.LinkBytes = ep.link.Stats().BytesDown - before
	})
}
