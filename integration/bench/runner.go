package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/integration/harness"
	"github.com/starlight-project/starlight/integration/linkem"
)

// namespace is the containerd namespace of every measurement.
const namespace = "bench"

// endpoint is one registry as seen through one profile's link.
type endpoint struct {
	profile Profile
	link    *linkem.Link
	host    string // 127.0.0.1:PORT of the link's proxy
}

func (e *endpoint) url() string { return "http://" + e.host }

// site is a profile's link with a proxy to each registry: all share
// the link's bandwidth.
type site struct {
	profile Profile
	link    *linkem.Link
	// fresh reaches the registry that never sees a trace, traced the
	// one that received v1's trace before v2 was pushed, plain the one
	// that holds the eStargz images ctr-remote converted (nil when
	// their registry was not needed).
	fresh, traced, plain *endpoint
}

type runner struct {
	opts Options
	res  *Result
	// Two registries, so that every system is measured in the same
	// interleaved loop: fresh serves the cold starts without traces and
	// plain containerd, traced the cold starts with traces and the
	// Starlight updates. plain, a registry that converts nothing, holds
	// the eStargz systems' images.
	fresh, traced, plain *harness.Registry
	sites                []*site
	capture              *traceCapture
	traces               map[string]*api.TraceReport
	// want are the systems to measure; esgzTags the tags of the
	// converted eStargz images, by workload and system.
	want     map[string]bool
	esgzTags map[string]map[string]string
	seq      atomic.Int64
}

func repoOf(w Workload) string { return "bench/" + w.Name }

func (r *runner) logf(format string, args ...any) { r.opts.Logf(format, args...) }

func (r *runner) run(ctx context.Context) error {
	env := harness.NewEnv()
	env.Log = func(string, ...any) {} // daemon start-up chatter
	defer env.Close()
	return env.Run(func() { r.phases(ctx, env) })
}

// stargzMissing returns why the eStargz systems cannot run, or "".
func (r *runner) stargzMissing() string {
	if r.opts.StargzBin == "" {
		return "no stargz-snapshotter binaries given (hack/bench.sh builds them; -stargz-bin, $STARGZ_BIN)"
	}
	for _, b := range []string{harness.StargzBinary, harness.CtrRemoteBinary} {
		if _, err := os.Stat(filepath.Join(r.opts.StargzBin, b)); err != nil {
			return fmt.Sprintf("no %s in %s", b, r.opts.StargzBin)
		}
	}
	return ""
}

func (r *runner) phases(ctx context.Context, env *harness.Env) {
	r.want = map[string]bool{}
	for _, s := range r.res.Systems {
		r.want[s] = true
	}
	if r.want[SysEstargz] || r.want[SysEstargzOpt] {
		if why := r.stargzMissing(); why != "" {
			r.res.note("the %s and %s systems are left out: %s", SysEstargz, SysEstargzOpt, why)
			r.logf("leaving out the eStargz systems: %s", why)
			delete(r.want, SysEstargz)
			delete(r.want, SysEstargzOpt)
		}
	}
	// The traced registry serves the systems that need v1's trace; the
	// limits come from its bundle headers.
	needTraced := r.want[SysStarlightTrace] || r.want[SysStarlightUpdate] || r.want[SysLimit] || r.want[SysLimitUpdate]
	needPlain := r.want[SysEstargz] || r.want[SysEstargzOpt]

	r.logf("starting the registries and dockerd")
	r.fresh = harness.StartRegistry(env, harness.RegistryOptions{LogLevel: "warn"})
	if needTraced {
		r.traced = harness.StartRegistry(env, harness.RegistryOptions{LogLevel: "warn"})
	}
	if needPlain {
		r.plain = harness.StartRegistry(env, harness.RegistryOptions{LogLevel: "warn", NoAutoConvert: true})
	}
	docker := harness.StartDockerd(env)
	for _, p := range r.opts.Profiles {
		link := linkem.New(p.Profile)
		env.Cleanup(link.Stop)
		st := &site{profile: p, link: link}
		for _, e := range []struct {
			reg *harness.Registry
			ep  **endpoint
		}{{r.fresh, &st.fresh}, {r.traced, &st.traced}, {r.plain, &st.plain}} {
			if e.reg == nil {
				continue
			}
			addr, err := link.Proxy("127.0.0.1:0", e.reg.Addr)
			if err != nil {
				env.Fatalf("link %s: %v", p.Name, err)
			}
			*e.ep = &endpoint{profile: p, link: link, host: addr.String()}
		}
		r.sites = append(r.sites, st)
	}
	var err error
	if needTraced {
		if r.capture, err = startCapture(env, r.traced.URL); err != nil {
			env.Fatalf("%v", err)
		}
	}

	push := func(reg *harness.Registry, img *BuiltImage, repo, tag string) {
		start := time.Now()
		docker.Push(env, &harness.Image{Name: img.Name, Archive: img.Archive}, reg.Addr+"/"+repo+":"+tag)
		st := reg.WaitReady(env, repo, tag)
		r.logf("pushed and converted %s/%s:%s in %s (%d layers, %d files)", reg.Addr, repo, tag, time.Since(start).Round(time.Second), st.Layers, st.Files)
	}
	for _, w := range r.opts.Workloads {
		push(r.fresh, w.V1, repoOf(w), "v1")
		if w.V2 != nil && r.want[SysContainerdUpdate] {
			push(r.fresh, w.V2, repoOf(w), "v2")
		}
		if needTraced {
			push(r.traced, w.V1, repoOf(w), "v1")
		}
	}

	// The eStargz images, converted from v1 by ctr-remote as a
	// stargz-snapshotter user would.
	r.esgzTags = map[string]map[string]string{}
	if needPlain {
		for _, w := range r.opts.Workloads {
			if ctx.Err() != nil {
				return
			}
			tags, err := r.convertEstargz(w)
			if err != nil {
				r.res.note("%s: ctr-remote conversion failed (%v); the eStargz rows are left out", w.Name, firstLine(err))
				r.logf("eStargz conversion of %s failed: %v", w.Name, err)
			}
			r.esgzTags[w.Name] = tags
		}
	}

	// One traced run per image, reported to the traced registry.
	r.traces = map[string]*api.TraceReport{}
	for _, w := range r.opts.Workloads {
		if !needTraced {
			break
		}
		if ctx.Err() != nil {
			return
		}
		rep, err := r.trace(w)
		if err != nil {
			r.res.note("%s: no trace (%v); the %s row and the limit are left out", w.Name, firstLine(err), SysStarlightTrace)
			r.logf("trace of %s failed: %v", w.Name, err)
			continue
		}
		r.logf("traced %s: %d accesses", w.Name, len(rep.Accesses))
		r.traces[w.Name] = rep
	}
	// v2 reaches the traced registry after v1 was traced, as a release
	// follows the previous one running in production; the registry gives
	// it v1's priorities by path.
	updateTraced := r.want[SysStarlightUpdate]
	for _, w := range r.opts.Workloads {
		if w.V2 != nil && updateTraced {
			push(r.traced, w.V2, repoOf(w), "v2")
		}
	}
	for _, w := range r.opts.Workloads {
		if !needTraced {
			break
		}
		lim, err := r.limit(w, r.traces[w.Name], updateTraced)
		if err != nil {
			r.res.note("%s: no limit: %v", w.Name, firstLine(err))
			continue
		}
		r.res.Limits[w.Name] = lim
	}

	// Every system in one loop; runs are the outer loop so that slow
	// drift of the machine spreads over every cell.
	for run := 1; run <= r.opts.Runs; run++ {
		for _, st := range r.sites {
			for _, w := range r.opts.Workloads {
				for _, sys := range r.res.Systems {
					if ctx.Err() != nil {
						return
					}
					if !r.want[sys] {
						continue
					}
					switch sys {
					case SysContainerd:
						r.add(r.plainCold(w, st.fresh, run))
					case SysEstargz, SysEstargzOpt:
						if tag := r.esgzTags[w.Name][sys]; tag != "" {
							r.add(r.estargz(w, st.plain, tag, run, sys))
						}
					case SysStarlight:
						r.add(r.starlight(w, st.fresh, r.fresh, run, SysStarlight))
					case SysStarlightTrace:
						if r.traces[w.Name] != nil {
							r.add(r.starlight(w, st.traced, r.traced, run, SysStarlightTrace))
						}
					case SysContainerdUpdate:
						if w.V2 != nil {
							r.add(r.plainUpdate(w, st.fresh, run))
						}
					case SysStarlightUpdate:
						if w.V2 != nil {
							r.add(r.starlightUpdate(w, st.traced, run))
						}
					}
				}
			}
		}
	}
}

func (r *runner) add(s Sample) {
	if s.Err != "" {
		r.logf("  %-8s %-5s %-18s run %d: FAILED: %s", s.Image, s.Profile, s.System, s.Run, firstLine(errString(s.Err)))
	} else {
		r.logf("  %-8s %-5s %-18s run %d: %6.2fs (pull %.2fs, start %.2fs, %s over the link)",
			s.Image, s.Profile, s.System, s.Run, s.Seconds, s.Pull, s.Start, mib(s.LinkBytes))
	}
	r.res.Samples = append(r.res.Samples, s)
}

type errString string

func (e errString) Error() string { return string(e) }

func firstLine(err error) string {
	s := err.Error()
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// scratchSize is the (sparse) size of the filesystem of one measurement:
// room for two versions of the largest image, compressed and unpacked.
const scratchSize = 32 << 30

// measure runs fn with a private Env for its daemons, on a fresh
// filesystem of their own, turning a failure into the sample's Err, and
// stops them afterwards.
// The daemons' logs of a failed measurement are kept in Result.FailureLogs.
func (r *runner) measure(s Sample, fn func(env *harness.Env, s *Sample)) Sample {
	env := harness.NewEnv()
	var logs strings.Builder
	env.Log = func(format string, args ...any) { fmt.Fprintf(&logs, format+"\n", args...) }
	err := env.Run(func() {
		env.UseScratchFilesystem(scratchSize)
		fn(env, &s)
	})
	env.Close() // dumps the daemons' logs into logs when err != nil
	if err != nil {
		s.Err = err.Error()
		s.Seconds = 0
		r.res.FailureLogs = append(r.res.FailureLogs, fmt.Sprintf("=== %s %s %s run %d: %s\n%s", s.Image, s.Profile, s.System, s.Run, s.Err, logs.String()))
	}
	return s
}

func (r *runner) ref(host string, w Workload, tag string) string {
	return host + "/" + repoOf(w) + ":" + tag
}

func (r *runner) containerID() string { return fmt.Sprintf("bench-%d", r.seq.Add(1)) }

// ctrRun runs the readiness check in a new container of ref and returns
// how long it took; extra are ctr run flags (the snapshotter).
func ctrRun(env *harness.Env, c *harness.Containerd, ref, id string, check []string, extra ...string) time.Duration {
	args := append([]string{"run", "--rm"}, extra...)
	args = append(append(args, ref, id), check...)
	start := time.Now()
	if out, err := c.CtrNSE(namespace, args...); err != nil {
		env.Fatalf("readiness check of %s: %v\n%s", ref, err, out)
	}
	return time.Since(start)
}

// plainCold: fresh containerd, ctr pull of v1 through the link, ctr run.
func (r *runner) plainCold(w Workload, ep *endpoint, run int) Sample {
	return r.measure(Sample{Image: w.Name, Profile: ep.profile.Name, System: SysContainerd, Run: run}, func(env *harness.Env, s *Sample) {
		c := harness.StartContainerd(env, harness.ContainerdOptions{Namespace: namespace})
		ref := r.ref(ep.host, w, "v1")
		before := ep.link.Stats().BytesDown
		start := time.Now()
		c.CtrNS(env, namespace, "images", "pull", "--plain-http", ref)
		s.Pull = time.Since(start).Seconds()
		s.Start = ctrRun(env, c, ref, r.containerID(), w.Check).Seconds()
		s.Seconds = time.Since(start).Seconds()
		s.LinkBytes = ep.link.Stats().BytesDown - before
		// The limit's third term: the check once more, now that the
		// image is complete on the local disk (untimed above).
		s.Local = ctrRun(env, c, ref, r.containerID(), w.Check).Seconds()
	})
}

// plainUpdate: fresh containerd holding v1 (pulled beside the link, it
// shares no layer with v2 anyway), then ctr pull of v2 through the link
// and ctr run.
func (r *runner) plainUpdate(w Workload, ep *endpoint, run int) Sample {
	return r.measure(Sample{Image: w.Name, Profile: ep.profile.Name, System: SysContainerdUpdate, Run: run}, func(env *harness.Env, s *Sample) {
		c := harness.StartContainerd(env, harness.ContainerdOptions{Namespace: namespace})
		c.CtrNS(env, namespace, "images", "pull", "--plain-http", r.ref(r.fresh.Addr, w, "v1"))
		ref := r.ref(ep.host, w, "v2")
		before := ep.link.Stats().BytesDown
		start := time.Now()
		c.CtrNS(env, namespace, "images", "pull", "--plain-http", ref)
		s.Pull = time.Since(start).Seconds()
		s.Start = ctrRun(env, c, ref, r.containerID(), w.Check).Seconds()
		s.Seconds = time.Since(start).Seconds()
		s.LinkBytes = ep.link.Stats().BytesDown - before
	})
}

// startNode is harness.StartNode with a quieter worker that knows both
// the link's endpoint and the registry itself.
func startNode(env *harness.Env, registries ...string) *harness.Node {
	dir := harness.ShortTempDir(env, "bnode-")
	sock := filepath.Join(dir, "sn.sock")
	c := harness.StartContainerd(env, harness.ContainerdOptions{StarlightSocket: sock, Namespace: namespace})
	w := harness.StartWorker(env, harness.WorkerOptions{Registries: registries, Containerd: c, Address: sock, LogLevel: "info", Metrics: true})
	return &harness.Node{Containerd: c, Worker: w}
}

// starlight: fresh worker, ctr-starlight pull of v1 through the link,
// ctr run --snapshotter starlight.
func (r *runner) starlight(w Workload, ep *endpoint, reg *harness.Registry, run int, system string) Sample {
	return r.measure(Sample{Image: w.Name, Profile: ep.profile.Name, System: system, Run: run}, func(env *harness.Env, s *Sample) {
		node := startNode(env, ep.url(), reg.URL)
		r.timeStarlight(env, node, ep, w, "v1", s)
	})
}

// starlightUpdate: fresh worker holding v1 complete (pulled beside the
// link), then v2 through the link, from the traced registry.
func (r *runner) starlightUpdate(w Workload, ep *endpoint, run int) Sample {
	return r.measure(Sample{Image: w.Name, Profile: ep.profile.Name, System: SysStarlightUpdate, Run: run}, func(env *harness.Env, s *Sample) {
		node := startNode(env, ep.url(), r.traced.URL)
		node.Worker.CLI(env, namespace, "pull", "--plain-http", "--wait", r.ref(r.traced.Addr, w, "v1"))
		r.timeStarlight(env, node, ep, w, "v2", s)
	})
}

func (r *runner) timeStarlight(env *harness.Env, node *harness.Node, ep *endpoint, w Workload, tag string, s *Sample) {
	ref := r.ref(ep.host, w, tag)
	before := ep.link.Stats().BytesDown
	demandBefore := node.Worker.Metric(env, "starlight_worker_demand_bytes_total")
	start := time.Now()
	node.Worker.CLI(env, namespace, "pull", "--plain-http", ref)
	s.Pull = time.Since(start).Seconds()
	s.Start = ctrRun(env, node.Containerd, ref, r.containerID(), w.Check, "--snapshotter", "starlight").Seconds()
	s.Seconds = time.Since(start).Seconds()
	s.LinkBytes = ep.link.Stats().BytesDown - before
	s.DemandBytes = int64(node.Worker.Metric(env, "starlight_worker_demand_bytes_total") - demandBefore)
	if img, ok := workerImage(node.Worker, ref); ok {
		s.SendBytes, s.DedupBytes, s.ReceivedAtReady = img.SendBytes, img.DedupBytes, img.BytesReceived
		if img.Ready != nil {
			s.WorkerReady = img.Ready.Sub(img.Started).Seconds()
		}
	}
}

func workerImage(w *harness.Worker, ref string) (api.WorkerImage, bool) {
	imgs, err := w.Images()
	if err != nil {
		return api.WorkerImage{}, false
	}
	for _, im := range imgs {
		if im.Ref == ref && im.Namespace == namespace {
			return im, true
		}
	}
	return api.WorkerImage{}, false
}
