package delta

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
)

// TestPlanShared: concurrent and later requests for the same plan share
// one computation, and each still gets its own resume point; another
// inventory, another header version or a new trace generation is
// another plan.
func TestPlanShared(t *testing.T) {
	s := newScene(t)
	gen := &testGeneration{v: "1"}
	p := s.f.planner().WithPriority(gen)
	srv := drained(s.server(t, p))
	req := api.DeltaRequest{Reference: "app:v1", HeaderVersion: bundle.Version}

	var wg sync.WaitGroup
	results := make([][]received, 8)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := req
			r.Resume = i % 3
			_, h, frames := fetch(t, srv, "app", s.app, r)
			if h.Resume != r.Resume {
				t.Errorf("resume %d, want %d", h.Resume, r.Resume)
			}
			results[i] = frames
		}()
	}
	wg.Wait()
	if st := p.Stats(); st.Computed != 1 || st.Reused != 7 {
		t.Errorf("8 requests: %+v, want 1 plan computed and 7 reused", st)
	}
	for i, frames := range results {
		if want := results[0][i%3:]; len(frames) != len(want) || !slices.EqualFunc(frames, want, sameFrame) {
			t.Errorf("request %d got other frames than the full stream from %d", i, i%3)
		}
	}

	for _, tc := range []struct {
		name   string
		change func(*api.DeltaRequest)
		plans  int64
	}{
		{"same request", func(*api.DeltaRequest) {}, 0},
		{"other inventory", func(r *api.DeltaRequest) { r.Have = []string{s.other.digest.String()} }, 1},
		{"same inventory, other order, duplicates", func(r *api.DeltaRequest) {
			r.Have = []string{s.base.digest.String(), s.other.digest.String(), s.other.digest.String()}
		}, 1},
		{"version 1", func(r *api.DeltaRequest) { r.HeaderVersion = 0 }, 1},
		{"new traces", func(*api.DeltaRequest) { gen.set("2") }, 1},
	} {
		before := p.Stats().Computed
		r := req
		tc.change(&r)
		fetch(t, srv, "app", s.app, r)
		if tc.name == "same inventory, other order, duplicates" {
			r.Have = []string{s.other.digest.String(), s.base.digest.String()}
		}
		fetch(t, srv, "app", s.app, r)
		if got := p.Stats().Computed - before; got != tc.plans {
			t.Errorf("%s: %d plans computed for two requests, want %d", tc.name, got, tc.plans)
		}
	}
}

// drained returns a scene's server whose handler-done signals nobody
// waits for.
func drained(srv *httptest.Server, done chan struct{}) *httptest.Server {
	go func() {
		for range done {
		}
	}()
	return srv
}

func sameFrame(a, b received) bool { return a.frame == b.frame && bytes.Equal(a.raw, b.raw) }

// testGeneration is a Priority that keeps the default order and reports a
// generation the test sets.
type testGeneration struct {
	mu sync.Mutex
	v  string
}

func (g *testGeneration) set(v string) { g.mu.Lock(); g.v = v; g.mu.Unlock() }

func (g *testGeneration) Generation(context.Context) (string, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.v, nil
}

func (g *testGeneration) Rank(context.Context, string, digest.Digest, []api.LayerTree, []Candidate) error {
	return nil
}

// TestPlanCacheBounds: plans beyond the size bound are not kept (every
// request computes one) and a cache of size 0 keeps none; spools leave no
// file in the spool directory.
func TestPlanCacheBounds(t *testing.T) {
	for _, tc := range []struct {
		name   string
		size   int64
		shared bool
	}{
		{"default", 0, true},
		{"too small", 100, false},
		{"none", -1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newScene(t)
			spool := t.TempDir()
			p := s.f.planner().WithLimits(Limits{CacheSize: tc.size, SpoolDir: spool})
			defer p.Close()
			srv := drained(s.server(t, p))
			for range 3 {
				fetch(t, srv, "app", s.app, api.DeltaRequest{})
			}
			want := int64(3)
			if tc.shared {
				want = 1
			}
			if st := p.Stats(); st.Computed != want {
				t.Errorf("3 requests in a row: %d plans computed, want %d", st.Computed, want)
			}
			if left, _ := os.ReadDir(spool); len(left) != 0 {
				t.Errorf("files left in the spool directory: %v", left)
			}
		})
	}
}

// TestPlanAbandoned: a request that gives up while its plan waits for a
// planning slot does not leave the plan to be computed for nobody, and
// the next request for it is served.
func TestPlanAbandoned(t *testing.T) {
	s := newScene(t)
	p := s.f.planner().WithLimits(Limits{Plans: 1})
	// Hold the only planning slot.
	p.plans.slots <- struct{}{}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := p.plans.get(ctx, "k", func(context.Context) (*prepared, error) {
			t.Error("an abandoned plan was computed")
			return nil, context.Canceled
		})
		errc <- err
	}()
	var fl *flight
	for fl == nil {
		p.plans.mu.Lock()
		fl = p.plans.flights["k"]
		p.plans.mu.Unlock()
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-errc; err != context.Canceled {
		t.Fatalf("abandoned request: %v", err)
	}
	<-fl.done
	if fl.err == nil {
		t.Error("the abandoned plan completed")
	}
	<-p.plans.slots
	srv := drained(s.server(t, p))
	fetch(t, srv, "app", s.app, api.DeltaRequest{})
}

// TestDeltaStalledReader: a client that stops reading is cut off after
// the write timeout, and its stream lets go of its blobs, while another
// client is served.
func TestDeltaStalledReader(t *testing.T) {
	f := newFixture(t)
	l := f.layer(reg("big", data(9, 4<<20)))
	m := f.image("app", l)
	p := f.planner().WithLimits(Limits{WriteTimeout: 200 * time.Millisecond})
	done := make(chan struct{}, 4)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() { done <- struct{}{} }()
		p.ServeDelta(w, r, api.DeltaRequest{}, m, "app")
	}))
	// Small socket buffers, so a client that stops reading stalls the
	// server after a few hundred kilobytes.
	srv.Listener = smallBuffers{srv.Listener}
	srv.Start()
	t.Cleanup(srv.Close)

	dialer := &net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	stalled := &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext}}
	resp, err := stalled.Post(srv.URL, "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if _, err := bundle.NewReader(resp.Body); err != nil {
		t.Fatal(err)
	}
	// The stalled stream ends by itself (the test's deadline is only a
	// bound on a hang).
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("the stream of a client that stopped reading is still running")
	}
	if n := waitClosed(f.blobs); n != 0 {
		t.Errorf("%d blobs left open by the stalled stream", n)
	}
	_, rest := io.Copy(io.Discard, resp.Body)
	if rest == nil {
		t.Error("the stalled client received the whole bundle")
	}

	// A client that reads gets everything.
	resp2, err := http.Post(srv.URL, "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp2.Body.Close()
	if _, frames, err := readBundle(resp2.Body); err != nil || len(frames) == 0 {
		t.Fatalf("reading client: %d frames, %v", len(frames), err)
	}
}

type smallBuffers struct{ net.Listener }

func (l smallBuffers) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetWriteBuffer(4096)
	}
	return c, err
}
