// Command demo runs Starlight's main job end to end on one machine, with
// private daemons started by the integration harness: a starlight-registry
// on the embedded defaults, dockerd, containerd and a starlight-worker. It
// pushes a generated image with docker, waits for the registry to convert
// it, pulls it with ctr-starlight, runs it with ctr, prints what happened
// with timings, and stops everything it started.
//
// Run it as root through hack/demo.sh (or `make demo`).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/starlight-project/starlight/integration/harness"
	"github.com/starlight-project/starlight/integration/linkem"
)

func main() {
	bigMB := flag.Int("big-mb", 64, "size of the large incompressible file in the demo image's second layer (MiB)")
	rtt := flag.Duration("rtt", 50*time.Millisecond, "round-trip time of the emulated link between worker and registry (0: no emulation)")
	mbps := flag.Float64("mbps", 100, "bandwidth of the emulated link in Mbit/s")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "demo: must run as root (containerd, runc, overlayfs, FUSE)")
		os.Exit(2)
	}

	env := harness.NewEnv()
	env.Log = func(format string, args ...any) { fmt.Printf("  "+format+"\n", args...) }
	// Stop everything on Ctrl-C too.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	done := make(chan error, 1)
	go func() { done <- env.Run(func() { demo(env, *bigMB, *rtt, *mbps) }) }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		err = fmt.Errorf("interrupted")
	}
	fmt.Println("==> stopping everything the demo started")
	env.Close()
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

type step struct {
	name string
	took time.Duration
}

func demo(env *harness.Env, bigMB int, rtt time.Duration, mbps float64) {
	var steps []step
	timed := func(name string, f func()) {
		fmt.Printf("==> %s\n", name)
		start := time.Now()
		f()
		steps = append(steps, step{name, time.Since(start)})
	}

	var reg *harness.Registry
	timed("start starlight-registry (filesystem storage, SQLite index, auto-convert)", func() {
		reg = harness.StartRegistry(env, harness.RegistryOptions{})
	})
	fmt.Printf("    config: %s\n", reg.ConfigPath)

	var docker *harness.Dockerd
	timed("start dockerd", func() { docker = harness.StartDockerd(env) })

	registryURL, registryHost := reg.URL, reg.Addr
	if rtt > 0 {
		link := linkem.New(linkem.Profile{RTT: rtt, Bandwidth: int64(mbps * 1e6)})
		env.Cleanup(link.Stop)
		addr, err := link.Proxy("127.0.0.1:0", reg.Addr)
		if err != nil {
			env.Fatalf("link emulator: %v", err)
		}
		registryURL, registryHost = "http://"+addr.String(), addr.String()
		fmt.Printf("==> the worker reaches the registry through an emulated WAN link (%s) at %s\n", link.Profile(), addr)
	}

	var node *harness.Node
	timed("start containerd and starlight-worker", func() { node = harness.StartNode(env, registryURL) })

	const repo, tag = "demo/app", "v1"
	var img *harness.Image
	timed(fmt.Sprintf("build a 2-layer image (busybox + %d MiB file)", bigMB), func() {
		img = harness.BuildImage(env, harness.LazyImage("starlight-demo/app:v1", int64(bigMB)<<20))
	})
	timed("docker push "+reg.Addr+"/"+repo+":"+tag, func() {
		docker.Push(env, img, reg.Addr+"/"+repo+":"+tag)
	})
	timed("wait for the registry to convert and index it", func() {
		st := reg.WaitReady(env, repo, tag)
		fmt.Printf("    %s: %s, converted as :%s (%s), %d layers, %d files\n",
			repo+":"+tag, st.State, st.ConvertedTag, st.ConvertedDigest, st.Layers, st.Files)
	})

	ref := registryHost + "/" + repo + ":" + tag
	const ns = "demo"
	timed("ctr-starlight pull "+ref, func() {
		fmt.Print(indent(node.Worker.CLI(env, ns, "pull", "--plain-http", ref)))
	})
	timed("ctr run --snapshotter starlight (reads one small file)", func() {
		fmt.Print(indent(node.Containerd.CtrNS(env, ns, "run", "--rm", "--snapshotter", "starlight", ref, "demo-app", "cat", "/small.txt")))
	})
	p := node.Worker.Progress(env, ref, ns)
	fmt.Printf("    when the container had finished: %d of %d bundle bytes had arrived (complete=%t)\n",
		p.BytesReceived, p.BytesTotal, p.Complete)
	timed("ctr-starlight pull --wait (the rest of the bundle)", func() {
		fmt.Print(indent(node.Worker.CLI(env, ns, "pull", "--plain-http", "--wait", ref)))
	})
	timed("ctr run: checksum of the large file", func() {
		fmt.Print(indent(node.Containerd.CtrNS(env, ns, "run", "--rm", "--snapshotter", "starlight", ref, "demo-sum", "sha256sum", "/big.bin")))
	})
	fmt.Println("==> ctr-starlight images")
	fmt.Print(indent(node.Worker.CLI(env, ns, "images")))

	fmt.Println("==> timings")
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	for _, s := range steps {
		fmt.Fprintf(tw, "    %s\t%s\n", s.name, s.took.Round(time.Millisecond))
	}
	tw.Flush()
}

func indent(s string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return ""
	}
	return "    " + strings.ReplaceAll(s, "\n", "\n    ") + "\n"
}
