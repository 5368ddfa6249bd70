package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/remotes/docker"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
	"github.com/starlight-project/starlight/api/remote"
	"github.com/starlight-project/starlight/integration/harness"
)

// TestRegistryUnderLoad is the registry's memory bound under traffic: 50
// concurrent delta requests for an image of 100,000 files, as workers
// send them (api/remote, which waits out a 503 with Retry-After), and 20
// clients that open a delta and never read it. Every request must be
// served whole or told to retry, and the registry's resident memory must
// stay within its configuration's bound, not grow with the requests.
//
// It reports the figures (peak RSS from /proc/PID/status VmHWM, reset
// after the conversion; p50/p99 of the deltas) with
//
//	make build && STARLIGHT_BIN=$PWD/bin go test ./integration -run TestRegistryUnderLoad -count=1 -v
func TestRegistryUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test skipped in -short mode")
	}
	const (
		files   = 100_000
		deltas  = 50
		stalled = 20
		repo    = "load/big"
		maxRSS  = 512 << 20
	)
	// The default bounds, spelled out: the figures are for them.
	reg := harness.StartRegistry(t, harness.RegistryOptions{LogLevel: "warn", Options: map[string]string{
		"maxbundlestreams": "32", "bundlequeuewait": "10s", "bundlewritetimeout": "1m",
		"maxbundleplans": "2", "plancachesize": "268435456"}})
	layer := make(harness.Layer, 0, files)
	for i := range files {
		layer = append(layer, harness.Entry{Name: fmt.Sprintf("/data/d%03d/f%06d", i/1000, i),
			Content: fmt.Appendf(nil, "file %d of the load test image\n", i)})
	}
	blob, diffID, err := harness.LayerBlob(layer)
	if err != nil {
		t.Fatal(err)
	}
	layer = nil
	desc := reg.PushBlob(t, repo, blob, harness.MediaTypeLayerGzip)
	reg.PushLayers(t, repo, "v1", []harness.Descriptor{desc}, []string{diffID})
	start := time.Now()
	if st := reg.WaitDone(t, repo, "v1"); st.State != api.StateReady {
		t.Fatalf("conversion: %+v", st)
	}
	pid := reg.PID()
	convPeak := procStatus(t, pid, "VmHWM")
	t.Logf("converted %d files in %v; registry peak RSS so far %d MiB", files, time.Since(start).Round(time.Second), convPeak>>20)
	// Measure the load alone: "5" resets the peak RSS (proc(5), clear_refs).
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
		t.Fatalf("resetting the registry's peak RSS: %v", err)
	}
	before := procStatus(t, pid, "VmRSS")

	req := api.DeltaRequest{Reference: repo + ":v1", HeaderVersion: bundle.Version}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	// The stalled clients: a receive buffer of 4 KiB, and no read.
	var stalledResp []*http.Response
	var stalledMu sync.Mutex
	stalledStatus := map[int]int{}
	var swg sync.WaitGroup
	dialer := &net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	stallClient := &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext, MaxConnsPerHost: 0}}
	body, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	for range stalled {
		swg.Add(1)
		go func() {
			defer swg.Done()
			hr, _ := http.NewRequestWithContext(ctx, http.MethodPost, reg.URL+remote.DeltaPath, bytes.NewReader(body))
			hr.Header.Set("Content-Type", "application/json")
			resp, err := stallClient.Do(hr)
			stalledMu.Lock()
			defer stalledMu.Unlock()
			if err != nil {
				t.Errorf("stalled client: %v", err)
				return
			}
			stalledStatus[resp.StatusCode]++
			stalledResp = append(stalledResp, resp)
		}()
	}
	defer func() {
		for _, r := range stalledResp {
			r.Body.Close()
		}
	}()

	// The workers, through api/remote; 503s are counted on the way.
	var busy atomic.Int64
	hosts := func(host string) ([]docker.RegistryHost, error) {
		hs, err := remote.StaticHosts(nil)(host)
		for i := range hs {
			hs[i].Client = &http.Client{Transport: countBusy{http.DefaultTransport, &busy}}
		}
		return hs, err
	}
	client := remote.New(remote.Options{Hosts: hosts}).WithPlainHTTP()
	type result struct {
		d      time.Duration
		frames int
		err    error
	}
	results := make([]result, deltas)
	var wg sync.WaitGroup
	var rssPeakSeen atomic.Int64
	stopSampling := make(chan struct{})
	go func() {
		for {
			select {
			case <-stopSampling:
				return
			case <-time.After(200 * time.Millisecond):
			}
			if rss := procStatusErr(pid, "VmRSS"); rss > rssPeakSeen.Load() {
				rssPeakSeen.Store(rss)
			}
		}
	}()
	loadStart := time.Now()
	for i := range deltas {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			n, err := readDelta(ctx, client, reg.Addr, repo, req)
			results[i] = result{time.Since(t0), n, err}
		}()
	}
	wg.Wait()
	swg.Wait()
	close(stopSampling)
	peak := procStatus(t, pid, "VmHWM")

	served, told := 0, 0
	var times []time.Duration
	for i, r := range results {
		var re *remote.RegistryError
		switch {
		case r.err == nil && r.frames == files:
			served++
			times = append(times, r.d)
		case errors.As(r.err, &re) && re.Status == http.StatusServiceUnavailable:
			told++
		default:
			t.Errorf("delta %d: %d frames, %v", i, r.frames, r.err)
		}
	}
	slices.Sort(times)
	pct := func(p float64) time.Duration {
		if len(times) == 0 {
			return 0
		}
		return times[min(len(times)-1, int(p*float64(len(times))))].Round(time.Millisecond)
	}
	t.Logf("%d deltas of %d files and %d stalled readers in %v: %d served whole, %d told to retry for good; %d answers 503 + Retry-After on the way; stalled clients' statuses %v",
		deltas, files, stalled, time.Since(loadStart).Round(time.Millisecond), served, told, busy.Load(), stalledStatus)
	t.Logf("delta time p50 %v, p99 %v; registry RSS %d MiB before, peak %d MiB (VmHWM; sampled %d MiB), limit %d MiB",
		pct(0.5), pct(0.99), before>>20, peak>>20, rssPeakSeen.Load()>>20, maxRSS>>20)
	for code := range stalledStatus {
		if code != http.StatusOK && code != http.StatusServiceUnavailable {
			t.Errorf("a stalled client was answered %d", code)
		}
	}
	if served == 0 {
		t.Error("no delta was served")
	}
	if peak > maxRSS {
		t.Errorf("registry peak RSS %d MiB under load, over %d MiB", peak>>20, maxRSS>>20)
	}
	if resp, _, err := reg.Get("/v2/", false); err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("registry after the load: %v %v", resp, err)
	}
}

// readDelta reads a whole bundle as a worker does (without storing it)
// and returns its frames.
func readDelta(ctx context.Context, c *remote.Client, host, repo string, req api.DeltaRequest) (int, error) {
	rc, err := c.Delta(ctx, host, repo, req)
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	br, err := bundle.NewReader(rc)
	if err != nil {
		return 0, err
	}
	n := 0
	for {
		_, raw, err := br.Next()
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		if _, err := io.Copy(io.Discard, raw); err != nil {
			return n, err
		}
		n++
	}
}

type countBusy struct {
	rt   http.RoundTripper
	busy *atomic.Int64
}

func (c countBusy) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := c.rt.RoundTrip(r)
	if err == nil && resp.StatusCode == http.StatusServiceUnavailable {
		c.busy.Add(1)
	}
	return resp, err
}

// procStatus reads a size field (kB) of /proc/PID/status, in bytes.
func procStatus(t *testing.T, pid int, field string) int64 {
	t.Helper()
	v := procStatusErr(pid, field)
	if v < 0 {
		t.Fatalf("no %s in /proc/%d/status", field, pid)
	}
	return v
}

func procStatusErr(pid int, field string) int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				return -1
			}
			return kb << 10
		}
	}
	return -1
}
