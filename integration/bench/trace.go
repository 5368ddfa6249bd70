package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
	"github.com/starlight-project/starlight/integration/harness"
	"github.com/starlight-project/starlight/worker/client"
)

// maxReport bounds a captured trace report, as the registry does.
const maxReport = api.MaxTraceReportSize

// traceCapture is a reverse proxy in front of the registry that keeps a
// copy of every trace report going through it: the benchmark needs the
// accesses to compute the physical limit, and the worker deletes a trace
// once reported.
type traceCapture struct {
	url     string
	mu      sync.Mutex
	reports []api.TraceReport
	status  map[string]int // registry's answer, by repository
}

func startCapture(env *harness.Env, registryURL string) (*traceCapture, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("trace capture: %w", err)
	}
	c := &traceCapture{url: "http://" + ln.Addr().String(), status: map[string]int{}}
	hc := &http.Client{Timeout: 2 * time.Minute}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, err := io.ReadAll(io.LimitReader(req.Body, maxReport+1))
		if err != nil || len(body) > maxReport {
			http.Error(w, "trace capture: body too large or unreadable", http.StatusRequestEntityTooLarge)
			return
		}
		var rep *api.TraceReport
		if req.Method == http.MethodPost && req.URL.Path == "/starlight/v1/traces" {
			rep = new(api.TraceReport)
			if json.Unmarshal(body, rep) != nil {
				rep = nil
			}
		}
		out, err := http.NewRequestWithContext(req.Context(), req.Method, registryURL+req.URL.RequestURI(), bytes.NewReader(body))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		out.Header = req.Header.Clone()
		resp, err := hc.Do(out)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		if rep != nil {
			c.mu.Lock()
			c.status[rep.Repository] = resp.StatusCode
			if resp.StatusCode/100 == 2 {
				c.reports = append(c.reports, *rep)
			}
			c.mu.Unlock()
		}
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		_, _ = io.Copy(w, resp.Body)
	})}
	go func() { _ = srv.Serve(ln) }()
	env.Cleanup(func() { _ = srv.Close() })
	return c, nil
}

// take returns and forgets the captured reports of repository.
func (c *traceCapture) take(repository string) []api.TraceReport {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out, rest []api.TraceReport
	for _, r := range c.reports {
		if r.Repository == repository {
			out = append(out, r)
		} else {
			rest = append(rest, r)
		}
	}
	c.reports = rest
	return out
}

func (c *traceCapture) statusOf(repository string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.status[repository]
}

// errNoTracing means the worker cannot trace (the feature is missing).
var errNoTracing = errors.New("the worker does not support tracing")

// trace records one run of w's readiness check on v1 with tracing on, as a
// user would (`ctr-starlight create --optimize`, `ctr task start`,
// delete, `ctr-starlight report`), and returns the report the registry
// received. The run is on a fresh worker that talks to the registry
// directly: the trace's content does not depend on the link.
func (r *runner) trace(w Workload) (*api.TraceReport, error) {
	var rep *api.TraceReport
	env := harness.NewEnv()
	env.Log = func(string, ...any) {}
	defer env.Close()
	err := env.Run(func() {
		node := startNode(env, r.traced.URL)
		ref := r.ref(r.traced.Addr, w, "v1")
		node.Worker.CLI(env, namespace, "pull", "--plain-http", ref)
		id := r.containerID()
		args := append([]string{"--address", node.Containerd.Address, "create", "--optimize", ref, id, "--"}, w.Check...)
		out, err := node.Worker.CLIE(namespace, args...)
		switch {
		case err == nil:
			if out, err := node.Containerd.CtrNSE(namespace, "task", "start", id); err != nil {
				env.Fatalf("traced run of %s: %v\n%s", ref, err, out)
			}
			_, _ = node.Containerd.CtrNSE(namespace, "task", "delete", id)
			if out, err := node.Containerd.CtrNSE(namespace, "container", "rm", id); err != nil {
				env.Fatalf("delete traced container: %v\n%s", err, out)
			}
		case strings.Contains(out, "unknown command"):
			// No create command yet: the optimize mode traces every
			// container, if the worker has it.
			c := client.New(node.Worker.API)
			defer c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if err := c.SetOptimize(ctx, true); err != nil {
				env.Fatalf("%v: no `ctr-starlight create` and no optimize mode (%v)", errNoTracing, err)
			}
			ctrRun(env, node.Containerd, ref, id, w.Check, "--snapshotter", "starlight")
			if err := c.SetOptimize(ctx, false); err != nil {
				env.Fatalf("optimize off: %v", err)
			}
		default:
			env.Fatalf("ctr-starlight create --optimize: %v", err)
		}
		rep = r.report(env, node, repoOf(w))
	})
	return rep, err
}

// report waits until the worker holds a finished trace, uploads it through
// the capture proxy with `ctr-starlight report --server`, and returns the
// accesses of the reports of repository merged in one report.
func (r *runner) report(env *harness.Env, node *harness.Node, repository string) *api.TraceReport {
	c := client.New(node.Worker.API)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for {
		ts, err := c.Traces(ctx)
		if err != nil {
			env.Fatalf("%v: listing traces: %v", errNoTracing, err)
		}
		recording := false
		for _, t := range ts {
			recording = recording || t.Recording
		}
		if len(ts) > 0 && !recording {
			break
		}
		if ctx.Err() != nil {
			env.Fatalf("the worker holds no finished trace (%d traces)", len(ts))
		}
		time.Sleep(200 * time.Millisecond)
	}
	out, err := node.Worker.CLIE(namespace, "report", "--server", r.capture.url)
	if err != nil && strings.Contains(out, "unknown command") {
		// An older CLI: the same API call.
		var res *api.ReportResult
		res, err = c.Report(ctx, api.ReportRequest{Server: r.capture.url})
		if err == nil {
			for _, t := range res.Traces {
				if t.Error != "" {
					err = errors.New(t.Error)
				}
			}
		}
	}
	reps := r.capture.take(repository)
	if err != nil {
		if len(reps) == 0 {
			env.Fatalf("ctr-starlight report: %v", err)
		}
		// The registry accepted the trace (the capture saw its 2xx
		// answer) but the worker took the answer for a failure.
		r.res.note("%s: `ctr-starlight report` failed although the registry accepted the trace (HTTP %d): %s",
			repository, r.capture.statusOf(repository), strings.Join(strings.Fields(out), " "))
	}
	if len(reps) == 0 {
		env.Fatalf("ctr-starlight report sent no trace of %s:\n%s", repository, out)
	}
	merged := reps[0]
	for _, rp := range reps[1:] {
		merged.Accesses = append(merged.Accesses, rp.Accesses...)
	}
	return &merged
}

// header fetches the bundle header of repository:tag for a worker holding
// have, straight from the registry, and drops the frames.
func (r *runner) header(repository, tag string, have []string) (*api.BundleHeader, error) {
	body, _ := json.Marshal(api.DeltaRequest{Reference: repository + ":" + tag, Have: have})
	req, err := http.NewRequest(http.MethodPost, r.traced.URL+"/starlight/delta", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("delta %s:%s: %w", repository, tag, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return nil, fmt.Errorf("delta %s:%s: %s: %s", repository, tag, resp.Status, b)
	}
	br, err := bundle.NewReader(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("delta %s:%s: %w", repository, tag, err)
	}
	return br.Header(), nil
}

// limit computes w's physical limit from its trace and the bundle headers;
// the update's only when update (v2 is on the traced registry).
func (r *runner) limit(w Workload, rep *api.TraceReport, update bool) (Limit, error) {
	var lim Limit
	h1, err := r.header(repoOf(w), "v1", nil)
	if err != nil {
		return lim, err
	}
	lim.ImageBytes = h1.Stats.ImageBytes
	if rep == nil {
		return lim, errors.New("no trace")
	}
	lim.Accesses = len(rep.Accesses)
	t1 := newTreeIndex(h1)
	paths := startupSet(t1, rep)
	lim.Files = len(paths.files)
	lim.StartupBytes, lim.StartupFileBytes = paths.bytes(t1, nil)
	if w.V2 != nil && update {
		var have []string
		for _, l := range h1.Layers {
			have = append(have, l.Digest)
		}
		h2, err := r.header(repoOf(w), "v2", have)
		if err != nil {
			return lim, err
		}
		lim.UpdateImageBytes = h2.Stats.SendBytes
		// The v2 startup set is v1's, matched by path in v2's merged
		// tree; a content v1 has costs nothing.
		lim.UpdateBytes, lim.UpdateFileBytes = paths.bytes(newTreeIndex(h2), t1.contents)
	}
	return lim, nil
}

// treeIndex locates entries of a bundle header: per layer by name, and
// the top-most entry of each path of the merged image.
type treeIndex struct {
	byLayer  map[string]map[string]*api.Entry
	top      map[string]*api.Entry
	contents map[string]bool
}

func newTreeIndex(h *api.BundleHeader) *treeIndex {
	t := &treeIndex{byLayer: map[string]map[string]*api.Entry{}, top: map[string]*api.Entry{}, contents: map[string]bool{}}
	for li := range h.Layers {
		l := &h.Layers[li]
		m := map[string]*api.Entry{}
		for i := range l.Entries {
			e := &l.Entries[i]
			m[e.Name] = e
			t.top[e.Name] = e
			if e.Digest != "" {
				t.contents[e.Digest] = true
			}
		}
		t.byLayer[l.Digest] = m
	}
	return t
}

// startup is the set read at startup: the paths, and per path the chunk
// offsets first read.
type startup struct {
	files map[string]map[int64]bool
}

func startupSet(t *treeIndex, rep *api.TraceReport) startup {
	s := startup{files: map[string]map[int64]bool{}}
	for _, a := range rep.Accesses {
		if layer, ok := t.byLayer[a.Layer]; ok {
			if e, ok := layer[a.Name]; !ok || e.Type != api.TypeReg {
				continue
			}
		}
		if s.files[a.Name] == nil {
			s.files[a.Name] = map[int64]bool{}
		}
		s.files[a.Name][a.ChunkOffset] = true
	}
	return s
}

// bytes sums the compressed sizes, in t's tree, of the startup chunks and
// of the whole startup files, counting each content once and skipping the
// contents in have.
func (s startup) bytes(t *treeIndex, have map[string]bool) (chunks, files int64) {
	seenChunk := map[string]bool{}
	seenFile := map[string]bool{}
	for name, offs := range s.files {
		e := t.top[name]
		if e == nil || e.Type != api.TypeReg || e.Digest == "" || have[e.Digest] {
			continue
		}
		if !seenFile[e.Digest] {
			seenFile[e.Digest] = true
			for _, c := range e.Chunks {
				files += c.CompressedSize
			}
		}
		for off := range offs {
			for _, c := range e.Chunks {
				if off >= c.Offset && off < c.Offset+c.Size || off == c.Offset {
					k := fmt.Sprintf("%s@%d", e.Digest, c.Offset)
					if !seenChunk[k] {
						seenChunk[k] = true
						chunks += c.CompressedSize
					}
					break
				}
			}
		}
	}
	return chunks, files
}
