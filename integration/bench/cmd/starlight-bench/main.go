// Command starlight-bench measures how long Starlight, plain containerd and
// stargz-snapshotter (eStargz) take to provision realistic Debian images
// through emulated links, next to the physical limit, and writes a markdown
// and CSV table and a plot.
//
// Run it as root through `make bench` (hack/bench.sh).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/starlight-project/starlight/integration/bench"
	"github.com/starlight-project/starlight/integration/harness"
)

func main() {
	root := harness.RepoRoot()
	images := flag.String("images", "", "comma-separated images (redis,nginx,python3,nodejs,jre); all when empty")
	profiles := flag.String("profiles", "", "comma-separated link profiles (LAN,WAN,edge); all when empty")
	systems := flag.String("systems", "", "comma-separated systems ("+strings.Join(bench.AllSystems(), ",")+"); all when empty. "+
		"limit needs containerd and starlight+trace's trace")
	stargzBin := flag.String("stargz-bin", os.Getenv("STARGZ_BIN"), "directory with containerd-stargz-grpc and ctr-remote for the estargz systems (hack/bench.sh builds them)")
	runs := flag.Int("runs", 3, "measurements per cell (the median is reported)")
	cache := flag.String("cache", filepath.Join(root, "integration/bench/cache"), "image build cache")
	out := flag.String("out", "", "results directory (default integration/bench/results/<date>)")
	buildOnly := flag.Bool("build-only", false, "build the images into the cache and stop")
	replot := flag.String("replot", "", "redraw DIR/plot.svg from DIR/results.csv and stop")
	flag.Parse()
	if *replot != "" {
		if err := bench.Replot(*replot); err != nil {
			fatal(err)
		}
		return
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "starlight-bench: must run as root (debootstrap, containerd, runc, overlayfs, FUSE)")
		os.Exit(2)
	}
	if *runs < 1 {
		fmt.Fprintln(os.Stderr, "starlight-bench: -runs must be at least 1")
		os.Exit(2)
	}
	logf := func(format string, args ...any) {
		fmt.Printf("%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
	}
	apps, err := bench.SelectApps(split(*images))
	if err != nil {
		fatal(err)
	}
	profs, err := bench.SelectProfiles(split(*profiles))
	if err != nil {
		fatal(err)
	}
	syss, err := bench.SelectSystems(split(*systems))
	if err != nil {
		fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	b := &bench.Builder{Cache: *cache, Mirrors: bench.SystemMirrors(), Logf: logf}
	workloads, err := b.BuildWorkloads(ctx, apps)
	if err != nil {
		fatal(err)
	}
	if *buildOnly {
		return
	}
	// The machine and the Starlight commit as the run starts: the
	// binaries are the ones built now.
	machine := bench.Machine()
	res, err := bench.Run(ctx, bench.Options{Workloads: workloads, Profiles: profs, Runs: *runs,
		Systems: syss, StargzBin: *stargzBin, Logf: logf})
	if res != nil {
		res.Machine = machine
		dir := *out
		if dir == "" {
			dir = freeDir(filepath.Join(root, "integration/bench/results", res.Started.UTC().Format("2006-01-02")))
		}
		if werr := res.WriteFiles(dir); werr != nil {
			fatal(werr)
		}
		logf("results in %s", dir)
		if md, rerr := os.ReadFile(filepath.Join(dir, "results.md")); rerr == nil {
			fmt.Println(string(md))
		}
	}
	if err != nil {
		fatal(err)
	}
	if ctx.Err() != nil {
		fatal(fmt.Errorf("interrupted: the results are partial"))
	}
}

// freeDir returns dir, or dir.2, dir.3, ... if it exists: a second run on
// the same day keeps the first one's results.
func freeDir(dir string) string {
	for i := 2; ; i++ {
		if _, err := os.Stat(dir); os.IsNotExist(err) {
			return dir
		}
		dir = fmt.Sprintf("%s.%d", strings.TrimSuffix(dir, fmt.Sprintf(".%d", i-1)), i)
	}
}

func split(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "starlight-bench:", err)
	os.Exit(1)
}
