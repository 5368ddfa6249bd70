package harness

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sort"
	"sync"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
)

// TearProxy is an HTTP proxy in front of a registry that tears delta
// bundles: it forwards every request, and cuts the connection of a
// POST /starlight/delta answer when the bundle reaches the next of its
// planned cuts. A cut is an offset in the bundle as its first stream lays
// it out (preamble, header, then every frame): an offset in the header
// cuts any stream there, an offset in the frames cuts whichever stream
// carries that byte of that frame, however it was resumed. Each cut is
// made once, in order.
type TearProxy struct {
	Addr string // 127.0.0.1:PORT
	URL  string // http://127.0.0.1:PORT

	upstream *url.URL
	plan     func(h *api.BundleHeader, headerSize int64) []int64
	srv      *http.Server

	mu    sync.Mutex
	cuts  []int64 // planned, not made yet, ascending
	head  int64   // header bytes of the first stream (preamble included)
	stats TearStats
}

// TearStats are what went through a TearProxy.
type TearStats struct {
	Streams     int   // delta answers forwarded, whole or cut
	Resumes     []int // the first frame (header.resume) of each stream
	Cuts        []Cut // the cuts made, in order
	HeaderBytes int64 // preamble and header bytes forwarded, all streams
	FrameBytes  int64 // frame bytes forwarded, all streams
}

// Cut is one connection a TearProxy cut.
type Cut struct {
	Offset int64 // in the bundle as the first stream lays it out
	// Frame is the frame the cut fell in, -1 for the header; Into is how
	// many of its bytes the stream had carried.
	Frame int
	Into  int64
	Size  int64 // the frame's compressed size
}

// StartTearProxy serves a TearProxy in front of upstream (http://HOST:PORT)
// until the test ends. plan is called with the header of the first
// bundle stream and the bytes it takes (preamble included) and returns
// the cuts, offsets in [0, headerSize + the frames' bytes).
func StartTearProxy(t T, upstream string, plan func(h *api.BundleHeader, headerSize int64) []int64) *TearProxy {
	t.Helper()
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatalf("tear proxy: %v", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("tear proxy: %v", err)
	}
	p := &TearProxy{Addr: l.Addr().String(), URL: "http://" + l.Addr().String(), upstream: u, plan: plan}
	rp := httputil.NewSingleHostReverseProxy(u)
	p.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.URL.Path == "/starlight/delta" {
			p.serveDelta(w, r)
			return
		}
		rp.ServeHTTP(w, r)
	})}
	go p.srv.Serve(l)
	t.Cleanup(func() { p.srv.Close() })
	return p
}

// Stats returns what went through the proxy so far.
func (p *TearProxy) Stats() TearStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.stats
	s.Cuts = append([]Cut(nil), p.stats.Cuts...)
	s.Resumes = append([]int(nil), p.stats.Resumes...)
	return s
}

// Remaining is the number of planned cuts not made yet.
func (p *TearProxy) Remaining() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.cuts)
}

func (p *TearProxy) serveDelta(w http.ResponseWriter, r *http.Request) {
	u := *p.upstream
	u.Path, u.RawQuery = r.URL.Path, r.URL.RawQuery
	req, err := http.NewRequestWithContext(r.Context(), r.Method, u.String(), r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	req.Header = r.Header.Clone()
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	for k, v := range resp.Header {
		w.Header()[k] = v
	}
	if resp.StatusCode != http.StatusOK {
		w.WriteHeader(resp.StatusCode)
		io.Copy(w, resp.Body)
		return
	}
	// The header, whole, to learn where this stream starts in the bundle.
	var pre [16]byte
	if _, err := io.ReadFull(resp.Body, pre[:]); err != nil {
		return
	}
	head := make([]byte, 16+binary.BigEndian.Uint64(pre[8:]))
	copy(head, pre[:])
	if _, err := io.ReadFull(resp.Body, head[16:]); err != nil {
		return
	}
	br, err := bundle.NewReader(bytes.NewReader(head))
	if err != nil {
		return
	}
	h := br.Header()
	starts := make([]int64, len(h.Frames)+1) // frame i starts at starts[i] of the frames
	for i, f := range h.Frames {
		starts[i+1] = starts[i] + f.CompressedSize
	}

	p.mu.Lock()
	p.stats.Streams++
	p.stats.Resumes = append(p.stats.Resumes, h.Resume)
	if p.stats.Streams == 1 {
		p.head = int64(len(head))
		p.cuts = p.plan(h, p.head)
		sort.Slice(p.cuts, func(i, j int) bool { return p.cuts[i] < p.cuts[j] })
	}
	// base is where this stream's frames start in the bundle as the
	// first stream lays it out.
	base := p.head + starts[h.Resume]
	next := int64(-1)
	if len(p.cuts) > 0 {
		next = p.cuts[0]
	}
	p.mu.Unlock()

	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	cut := func(c Cut) {
		p.mu.Lock()
		p.cuts = p.cuts[1:]
		p.stats.Cuts = append(p.stats.Cuts, c)
		p.mu.Unlock()
		rc.Flush()
		if conn, _, err := rc.Hijack(); err == nil {
			conn.Close() // ends the chunked body short: the client reads an unexpected EOF
		}
	}
	if next >= 0 && next < p.head {
		// In the header: every stream has one.
		n := min(next, int64(len(head)))
		w.Write(head[:n])
		p.count(n, 0)
		cut(Cut{Offset: next, Frame: -1, Into: n, Size: int64(len(head))})
		return
	}
	w.Write(head)
	p.count(int64(len(head)), 0)
	rc.Flush()

	pos := base
	buf := make([]byte, 32<<10)
	for {
		want := int64(len(buf))
		if next >= 0 && next-pos < want {
			want = next - pos
		}
		if want <= 0 {
			i := sort.Search(len(h.Frames), func(i int) bool { return starts[i+1] > pos-p.head })
			c := Cut{Offset: next, Frame: i}
			if i < len(h.Frames) {
				c.Into, c.Size = pos-p.head-starts[i], h.Frames[i].CompressedSize
			}
			cut(c)
			return
		}
		n, err := resp.Body.Read(buf[:want])
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			p.count(0, int64(n))
			pos += int64(n)
			rc.Flush()
		}
		if err != nil {
			return // the end of the bundle (or of the registry's answer)
		}
	}
}

func (p *TearProxy) count(header, frames int64) {
	p.mu.Lock()
	p.stats.HeaderBytes += header
	p.stats.FrameBytes += frames
	p.mu.Unlock()
}

// String describes a cut, for logs.
func (c Cut) String() string {
	if c.Frame < 0 {
		return fmt.Sprintf("@%d in the header", c.Offset)
	}
	return fmt.Sprintf("@%d in frame %d (%d of %d bytes)", c.Offset, c.Frame, c.Into, c.Size)
}
