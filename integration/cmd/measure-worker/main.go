// Command measure-worker measures a Starlight worker against containerd's
// overlayfs snapshotter on one machine: time-to-ready of a cold image over an
// emulated WAN link, then, with both images complete, the steady-state read
// throughput of a large file, the time of a metadata walk and of reading
// every file inside a container, with Starlight's time over overlayfs's.
// `make bench` runs it after the benchmark. Run as root after `make build`:
//
//	go run ./integration/cmd/measure-worker -rtt 50ms -mbps 100
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/starlight-project/starlight/integration/harness"
	"github.com/starlight-project/starlight/integration/linkem"
)

func main() {
	bigMB := flag.Int("big-mb", 256, "size of the large incompressible file (MiB)")
	small := flag.Int("small-files", 5000, "number of small files (for the metadata walk)")
	rtt := flag.Duration("rtt", 50*time.Millisecond, "round-trip time of the emulated link")
	mbps := flag.Float64("mbps", 100, "bandwidth of the emulated link in Mbit/s")
	runs := flag.Int("runs", 3, "repetitions of each in-container measurement")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "measure-worker: must run as root")
		os.Exit(2)
	}
	env := harness.NewEnv()
	env.Log = func(format string, args ...any) {}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	done := make(chan error, 1)
	go func() { done <- env.Run(func() { measure(env, *bigMB, *small, *rtt, *mbps, *runs) }) }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		err = fmt.Errorf("interrupted")
	}
	env.Close()
	if err != nil {
		fmt.Fprintln(os.Stderr, "measure-worker:", err)
		os.Exit(1)
	}
}

func image(bigMB, small int) harness.ImageSpec {
	base := append(harness.BusyboxLayer(), harness.Entry{Name: "/small.txt", Content: []byte("ready\n")})
	big := harness.Layer{{Name: "/big.bin", RandomSize: int64(bigMB) << 20, RandomSeed: 7}}
	var tree harness.Layer
	for i := range small {
		tree = append(tree, harness.Entry{
			Name:    fmt.Sprintf("/tree/d%02d/d%02d/f%05d", i%37, i%11, i),
			Content: []byte(strconv.Itoa(i)),
		})
	}
	return harness.ImageSpec{Name: "starlight-measure/app:v1", Layers: []harness.Layer{base, big, tree}}
}

func measure(env *harness.Env, bigMB, small int, rtt time.Duration, mbps float64, runs int) {
	reg := harness.StartRegistry(env, harness.RegistryOptions{})
	docker := harness.StartDockerd(env)
	link := linkem.New(linkem.Profile{RTT: rtt, Bandwidth: int64(mbps * 1e6)})
	env.Cleanup(link.Stop)
	addr, err := link.Proxy("127.0.0.1:0", reg.Addr)
	if err != nil {
		env.Fatalf("link emulator: %v", err)
	}
	host := addr.String()
	node := harness.StartNode(env, "http://"+host)

	img := harness.BuildImage(env, image(bigMB, small))
	docker.Push(env, img, reg.Addr+"/measure/app:v1")
	st := reg.WaitReady(env, "measure/app", "v1")
	ref := host + "/measure/app:v1"
	fmt.Printf("image: busybox + %d MiB file + %d small files; %d files indexed; link %s\n", bigMB, small, st.Files, link.Profile())

	const plainNS, slNS = "plain", "starlight"
	timed := func(f func()) time.Duration { start := time.Now(); f(); return time.Since(start) }

	plain := timed(func() {
		node.Containerd.CtrNS(env, plainNS, "images", "pull", "--plain-http", ref)
		node.Containerd.CtrNS(env, plainNS, "run", "--rm", "--snapshotter", "overlayfs", ref, "p-ready", "cat", "/small.txt")
	})
	var pullOnly time.Duration
	sl := timed(func() {
		pullOnly = timed(func() { node.Worker.CLI(env, slNS, "pull", "--plain-http", ref) })
		node.Containerd.CtrNS(env, slNS, "run", "--rm", "--snapshotter", "starlight", ref, "s-ready", "cat", "/small.txt")
	})
	p := node.Worker.Progress(env, ref, slNS)
	fmt.Printf("\ntime-to-ready (pull + run `cat /small.txt`) over %s:\n", link.Profile())
	fmt.Printf("  containerd (ctr pull + ctr run, overlayfs): %8.2fs\n", plain.Seconds())
	fmt.Printf("  starlight  (ctr-starlight pull + ctr run):  %8.2fs (pull returned after %.2fs; %d of %d bundle bytes had arrived at exit)  speed-up %.1fx\n",
		sl.Seconds(), pullOnly.Seconds(), p.BytesReceived, p.BytesTotal, plain.Seconds()/sl.Seconds())
	for _, line := range strings.Split(node.Worker.Log(), "\n") {
		if strings.Contains(line, "image ready") {
			fmt.Printf("  worker: %s\n", line)
		}
	}

	node.Worker.CLI(env, slNS, "pull", "--plain-http", "--wait", ref)

	fmt.Printf("\nwith both images complete (median of %d runs, inside the container):\n", runs)
	for _, m := range []struct {
		name, cmd string
		cold      bool
	}{
		{fmt.Sprintf("read /big.bin (%d MiB), cold, MB/s", bigMB), "busybox time -p dd if=/big.bin of=/dev/null bs=1M", true},
		{fmt.Sprintf("read /big.bin (%d MiB), warm, MB/s", bigMB), "busybox time -p dd if=/big.bin of=/dev/null bs=1M", false},
		{"find / -xdev | wc -l, cold, seconds", "busybox time -p sh -c 'find / -xdev | wc -l'", true},
		{"find / -xdev | wc -l, warm, seconds", "busybox time -p sh -c 'find / -xdev | wc -l'", false},
		{"cat every file, cold, seconds", "busybox time -p sh -c 'find / -xdev -type f -exec cat {} + >/dev/null'", true},
		{"cat every file, warm, seconds", "busybox time -p sh -c 'find / -xdev -type f -exec cat {} + >/dev/null'", false},
	} {
		cold := m.cold
		var medians []float64
		for _, sn := range []struct{ ns, snapshotter string }{{plainNS, "overlayfs"}, {slNS, "starlight"}} {
			var vals []float64
			for i := range runs {
				if cold {
					// Cold: nothing of the image in the page cache or the
					// dentry cache.
					if err := dropCaches(); err != nil {
						env.Fatalf("dropping caches: %v", err)
					}
				}
				out := node.Containerd.CtrNS(env, sn.ns, "run", "--rm", "--snapshotter", sn.snapshotter, ref,
					fmt.Sprintf("m-%s-%d", sn.ns, i), "sh", "-c", m.cmd+" 2>&1")
				secs := realSeconds(env, out)
				if strings.HasPrefix(m.name, "read") {
					vals = append(vals, float64(bigMB)*1.048576/secs)
				} else {
					vals = append(vals, secs)
				}
			}
			fmt.Printf("  %-44s %-10s %8.3f  (runs: %v)\n", m.name, sn.snapshotter, median(vals), vals)
			medians = append(medians, median(vals))
		}
		// Starlight's time over overlayfs's (for throughput, the inverse).
		ratio := medians[1] / medians[0]
		if strings.HasPrefix(m.name, "read /big.bin") {
			ratio = medians[0] / medians[1]
		}
		fmt.Printf("  %-44s %-10s %7.2fx\n", "", "ratio", ratio)
	}
}

var realRE = regexp.MustCompile(`(?m)^real\s+([0-9.]+)`)

func realSeconds(env *harness.Env, out string) float64 {
	m := realRE.FindStringSubmatch(out)
	if m == nil {
		env.Fatalf("no timing in output:\n%s", out)
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	if v <= 0 {
		v = 0.005 // below busybox time's resolution
	}
	return v
}

func dropCaches() error {
	syscall.Sync()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s[len(s)/2]
}
