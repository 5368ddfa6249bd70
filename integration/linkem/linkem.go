// Package linkem is a userspace WAN link emulator: a TCP proxy that adds
// round-trip time, caps bandwidth and queues. The kernel used for the
// tests has no netem, and a userspace link is also what lets the benchmark
// run on any machine without privileges.
//
// A Link stands for one network path: every connection through any of its
// proxies shares it, as the connections of one host share a WAN uplink.
// Its Profile gives the round-trip time and the capacity of each
// direction; Profile.Model selects how the capacity is shared.
//
// # ModelFIFO (the default)
//
// A drop-tail router in front of a long fat pipe, as TCP sees it:
//
//   - Bottleneck: each direction has one FIFO queue shared by every
//     connection. A segment read from one side at time a joins the queue in
//     arrival order and leaves it at d = max(a, d_prev) + size/rate, where
//     d_prev is the departure of the segment queued before it; it is written
//     to the other side at d + RTT/2. A segment never overtakes one queued
//     before it in the same direction: a small response queues behind the
//     bytes a bulk stream already has in the queue.
//   - Buffer: the queue holds at most Profile.BufferBDP × BDP bytes
//     (default 2; at least 64 KiB), BDP = rate × RTT, counting the bytes not
//     yet serialised. A segment that does not fit waits in its sender until
//     enough has drained: the proxy stops reading that connection, which
//     the real sender sees as back-pressure. Where a router would drop the
//     segment and TCP back off, nothing is lost here; senders waiting for
//     room enter the queue in the order they arrived.
//   - Congestion window: each direction of each connection has at most
//     cwnd bytes in flight: read from the sender and not yet acknowledged,
//     the acknowledgement arriving RTT/2 after the segment was written to
//     the receiver (so a receiver that does not read holds the window
//     closed, as its receive window would). cwnd starts at initcwnd = 10 ×
//     1460 bytes (RFC 6928) and grows by the bytes acknowledged (slow
//     start: it doubles every RTT) up to Profile.CwndCapBDP × BDP (default
//     4; at least initcwnd). A new connection thus needs about
//     log2(BDP/initcwnd) round trips to fill the pipe, and a long stream,
//     whose window can exceed the pipe plus the buffer (3 × BDP with the
//     defaults), keeps the buffer full: a standing queue of BufferBDP round
//     trips that every other connection's segments wait behind.
//   - Handshake: opening a connection costs one RTT plus the queueing of
//     the SYN in the upstream queue and of the SYN-ACK in the downstream
//     one, before data flows.
//
// Not modelled: loss and retransmission (the buffer never drops, so there
// is no congestion avoidance, fast recovery or retransmission timeout: a
// window only grows, up to its cap); reordering; jitter; acknowledgements
// taking capacity or queueing behind the reverse direction's data (they
// take exactly RTT/2, so there is no ACK compression); delayed ACKs and
// Nagle; slow-start restart after idle (a connection keeps its window);
// packet framing (a segment is one read of up to 32 KiB, never more than
// the open window, headers are not counted).
//
// # ModelTokenBucket
//
// The earlier model, kept for comparison: each direction is a delay line
// behind one token bucket shared by every connection; a segment is written
// to the other side RTT/2 after its tokens are paid. There is no standing
// queue (a new small request waits for at most the segment being paid)
// and no slow start, so it is kinder than a real WAN to short requests
// that share the link with a bulk stream. Opening a connection costs one
// RTT.
//
// With Bandwidth 0 both models are a pure delay line (and a one-RTT
// handshake).
//
// ModelFIFO is the default because it is strictly more faithful for what
// the link is used for (a startup read racing a bundle stream, many
// parallel GETs over fresh connections): it adds the queueing delay and
// the slow-start round trips a real path has and the token bucket hides,
// it still delivers the profile's rate to a long transfer, and the zero
// Profile fields keep every existing caller compiling and working. A caller
// that wants the earlier numbers sets Model: ModelTokenBucket;
// Profile.String names the model and its parameters.
package linkem

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// Model is how a link shares its capacity among connections.
type Model int

const (
	// ModelFIFO is a FIFO bottleneck queue per direction with a bounded
	// buffer, and a TCP-like congestion window per connection (slow
	// start up to a cap). The zero value.
	ModelFIFO Model = iota
	// ModelTokenBucket is a token bucket per direction and a delay line,
	// with no standing queue and no congestion window.
	ModelTokenBucket
)

func (m Model) String() string {
	switch m {
	case ModelFIFO:
		return "fifo"
	case ModelTokenBucket:
		return "token bucket"
	}
	return fmt.Sprintf("Model(%d)", int(m))
}

// Profile describes a link.
type Profile struct {
	// RTT is the round-trip time added to the loopback's own.
	RTT time.Duration
	// Bandwidth is the capacity of each direction in bits per second;
	// zero means unlimited.
	Bandwidth int64
	// Model selects the link model; the zero value is ModelFIFO.
	Model Model
	// BufferBDP is ModelFIFO's bottleneck buffer per direction in
	// bandwidth-delay products; zero means 2. The buffer is at least
	// 64 KiB.
	BufferBDP float64
	// CwndCapBDP caps ModelFIFO's congestion window of each connection
	// in bandwidth-delay products; zero means 4. The cap is at least the
	// initial window (10 × 1460 bytes).
	CwndCapBDP float64
}

const (
	defaultBufferBDP  = 2
	defaultCwndCapBDP = 4
	minBuffer         = 64 << 10
	// mss is the TCP segment size the initial window is counted in; a
	// sender waits for at least that much open window.
	mss      = 1460
	initCwnd = 10 * mss
	// headerBytes is what a SYN or SYN-ACK takes in the queue.
	headerBytes = 64
)

func (p Profile) String() string {
	if p.Bandwidth <= 0 {
		return fmt.Sprintf("rtt %s, unlimited", p.RTT)
	}
	s := fmt.Sprintf("rtt %s, %g Mbit/s", p.RTT, float64(p.Bandwidth)/1e6)
	if p.Model == ModelFIFO {
		return fmt.Sprintf("%s, fifo buffer %g×BDP, cwnd ≤ %g×BDP", s, p.bufferBDP(), p.cwndCapBDP())
	}
	return s + ", " + p.Model.String()
}

// BytesPerSecond is the bandwidth in bytes per second (0 if unlimited).
func (p Profile) BytesPerSecond() float64 { return float64(p.Bandwidth) / 8 }

// bdp is the bandwidth-delay product in bytes (0 if unlimited).
func (p Profile) bdp() float64 { return p.BytesPerSecond() * p.RTT.Seconds() }

func (p Profile) bufferBDP() float64 {
	if p.BufferBDP > 0 {
		return p.BufferBDP
	}
	return defaultBufferBDP
}

func (p Profile) cwndCapBDP() float64 {
	if p.CwndCapBDP > 0 {
		return p.CwndCapBDP
	}
	return defaultCwndCapBDP
}

// buffer is ModelFIFO's bottleneck buffer in bytes.
func (p Profile) buffer() int64 {
	return max(int64(p.bufferBDP()*p.bdp()), minBuffer)
}

// cwndCap is ModelFIFO's congestion window cap in bytes.
func (p Profile) cwndCap() int64 {
	return max(int64(p.cwndCapBDP()*p.bdp()), initCwnd)
}

const (
	// segmentSize bounds one read, hence one timestamped segment.
	segmentSize = 32 << 10
	// queueSegments bounds the segments in flight per direction of a
	// connection (memory: queueSegments × segmentSize). A full queue
	// stops reading, which is TCP back-pressure on the sender.
	queueSegments = 512
)

// Stats are the link's counters.
type Stats struct {
	BytesUp     int64 // delivered from clients to targets
	BytesDown   int64 // delivered from targets to clients
	Connections int64 // accepted so far
	// PeakQueueUp and PeakQueueDown are the most bytes ModelFIFO's
	// bottleneck queue held in each direction (at most the buffer).
	PeakQueueUp, PeakQueueDown int64
	// PeakInFlight is the most bytes one direction of one connection had
	// in flight under ModelFIFO (at most the window cap).
	PeakInFlight int64
}

// Link is an emulated link. Every proxy of a Link shares its bandwidth.
type Link struct {
	profile Profile
	// ModelTokenBucket: nil when unlimited or ModelFIFO.
	up   *rate.Limiter // client → target
	down *rate.Limiter // target → client
	// ModelFIFO: nil when unlimited or ModelTokenBucket.
	upQ, downQ *bottleneck

	bytesUp, bytesDown, conns atomic.Int64
	// held is the payload read from one side and not yet written to the
	// other (the emulator's memory); peakHeld and peakInFlight are maxima.
	held, peakHeld, peakInFlight atomic.Int64

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	listeners []net.Listener
	open      map[net.Conn]struct{}
	stopped   bool
}

// New returns a link with profile p. Call Proxy to put it in front of a
// server, and Stop when done.
func New(p Profile) *Link {
	ctx, cancel := context.WithCancel(context.Background())
	l := &Link{profile: p, ctx: ctx, cancel: cancel, open: map[net.Conn]struct{}{}}
	if p.Bandwidth > 0 {
		switch p.Model {
		case ModelTokenBucket:
			l.up = newLimiter(p)
			l.down = newLimiter(p)
		default:
			l.upQ = newBottleneck(p)
			l.downQ = newBottleneck(p)
		}
	}
	return l
}

// newLimiter returns a token bucket of the link's rate. The bucket holds a
// few milliseconds of traffic (at least one segment) so that fast links are
// not slowed by timer granularity, while slow links get no large free burst.
func newLimiter(p Profile) *rate.Limiter {
	bps := p.BytesPerSecond()
	burst := int(bps * 0.005)
	if burst < 2*segmentSize {
		burst = 2 * segmentSize
	}
	lim := rate.NewLimiter(rate.Limit(bps), burst)
	// Start with an empty bucket: an idle link has no credit to spend.
	lim.AllowN(time.Now(), burst)
	return lim
}

// bottleneck is one direction's FIFO queue, in virtual time: it keeps
// only when the last admitted segment leaves, since at a constant rate
// the bytes queued at t are (free - t) × rate.
type bottleneck struct {
	rate   float64 // bytes per second
	buffer int64   // bytes

	mu   sync.Mutex
	free time.Time // departure of the last segment admitted
	peak int64     // most bytes queued
}

func newBottleneck(p Profile) *bottleneck {
	return &bottleneck{rate: p.BytesPerSecond(), buffer: p.buffer()}
}

func (b *bottleneck) duration(n int64) time.Duration {
	return time.Duration(math.Ceil(float64(n) / b.rate * float64(time.Second)))
}

// enqueue queues a segment of n bytes that arrives at now, after every
// segment enqueued before. It returns when the segment enters the buffer
// (later than now if the buffer is full: the sender waits until then)
// and when its last byte leaves the bottleneck.
func (b *bottleneck) enqueue(now time.Time, n int64) (admit, depart time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	admit, start := now, now
	if b.free.After(now) {
		start = b.free
		// Room for n bytes once the queue ahead is down to buffer - n.
		if t := b.free.Add(-b.duration(b.buffer - n)); t.After(admit) {
			admit = t
		}
	}
	depart = start.Add(b.duration(n))
	b.free = depart
	if q := int64(math.Floor(depart.Sub(admit).Seconds() * b.rate)); q > b.peak {
		b.peak = q
	}
	return admit, depart
}

func (b *bottleneck) peakBytes() int64 {
	if b == nil {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.peak
}

// window is a congestion window of one direction of one connection. The
// reader (the sender side) spends it, the writer posts the
// acknowledgements.
type window struct {
	cap int64

	mu       sync.Mutex
	cwnd     int64
	inflight int64
	acks     []ack // posted, not yet due; in order
	wake     chan struct{}
}

type ack struct {
	at time.Time
	n  int64
}

func newWindow(limit int64) *window {
	return &window{cap: limit, cwnd: min(initCwnd, limit), wake: make(chan struct{}, 1)}
}

// poll applies the acknowledgements due by now (slow start: the window
// grows by the bytes acknowledged, up to its cap) and returns the open
// window and when the next posted acknowledgement is due (zero if none).
func (w *window) poll(now time.Time) (open int64, next time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	i := 0
	for ; i < len(w.acks) && !w.acks[i].at.After(now); i++ {
		w.inflight -= w.acks[i].n
		w.cwnd = min(w.cwnd+w.acks[i].n, w.cap)
	}
	w.acks = w.acks[i:]
	if len(w.acks) > 0 {
		next = w.acks[0].at
	}
	return w.cwnd - w.inflight, next
}

// sent records n bytes put in flight and returns the bytes in flight.
func (w *window) sent(n int64) int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.inflight += n
	return w.inflight
}

// acked posts the acknowledgement of n bytes, due at at.
func (w *window) acked(at time.Time, n int64) {
	w.mu.Lock()
	w.acks = append(w.acks, ack{at: at, n: n})
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// wait blocks until at least one MSS of the window is open and returns
// the open window.
func (w *window) wait(ctx context.Context, timer *time.Timer) (int64, error) {
	for {
		open, next := w.poll(time.Now())
		if open >= mss {
			return open, nil
		}
		var due <-chan time.Time
		if !next.IsZero() {
			timer.Reset(time.Until(next))
			due = timer.C
		}
		select {
		case <-due:
		case <-w.wake:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// Profile returns the link's profile.
func (l *Link) Profile() Profile { return l.profile }

// Stats returns the link's counters.
func (l *Link) Stats() Stats {
	return Stats{
		BytesUp: l.bytesUp.Load(), BytesDown: l.bytesDown.Load(), Connections: l.conns.Load(),
		PeakQueueUp: l.upQ.peakBytes(), PeakQueueDown: l.downQ.peakBytes(),
		PeakInFlight: l.peakInFlight.Load(),
	}
}

func storeMax(v *atomic.Int64, n int64) {
	for {
		old := v.Load()
		if n <= old || v.CompareAndSwap(old, n) {
			return
		}
	}
}

// Proxy listens on listenAddr ("127.0.0.1:0" for an ephemeral port) and
// forwards every connection to targetAddr through the link. It returns
// the address it listens on.
func (l *Link) Proxy(listenAddr, targetAddr string) (net.Addr, error) {
	ln, err := net.Listen("tcp", listenAddr)
	if err != nil {
		return nil, fmt.Errorf("linkem: listen %s: %w", listenAddr, err)
	}
	l.mu.Lock()
	if l.stopped {
		l.mu.Unlock()
		ln.Close()
		return nil, errors.New("linkem: link stopped")
	}
	l.listeners = append(l.listeners, ln)
	l.wg.Add(1)
	l.mu.Unlock()
	go l.accept(ln, targetAddr)
	return ln.Addr(), nil
}

// Stop closes the listeners and every connection, and waits for the
// forwarding goroutines to end.
func (l *Link) Stop() {
	l.mu.Lock()
	l.stopped = true
	l.cancel()
	for _, ln := range l.listeners {
		ln.Close()
	}
	for c := range l.open {
		c.Close()
	}
	l.mu.Unlock()
	l.wg.Wait()
}

func (l *Link) track(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stopped {
		c.Close()
		return false
	}
	l.open[c] = struct{}{}
	return true
}

func (l *Link) untrack(c net.Conn) {
	l.mu.Lock()
	delete(l.open, c)
	l.mu.Unlock()
	c.Close()
}

func (l *Link) accept(ln net.Listener, target string) {
	defer l.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return // closed by Stop
		}
		if !l.track(c) {
			return
		}
		l.conns.Add(1)
		l.wg.Add(1)
		go l.serve(c, target)
	}
}

// handshake waits for the TCP handshake: one round trip, and under
// ModelFIFO the SYN's and the SYN-ACK's turns in the queues.
func (l *Link) handshake(ctx context.Context) bool {
	if l.upQ == nil {
		return sleep(ctx, l.profile.RTT)
	}
	for _, q := range []*bottleneck{l.upQ, l.downQ} {
		_, depart := q.enqueue(time.Now(), headerBytes)
		if !sleep(ctx, time.Until(depart.Add(l.profile.RTT/2))) {
			return false
		}
	}
	return true
}

// serve forwards one connection until both directions are closed or one
// fails.
func (l *Link) serve(client net.Conn, target string) {
	defer l.wg.Done()
	defer l.untrack(client)
	ctx, cancel := context.WithCancel(l.ctx)
	defer cancel()

	var d net.Dialer
	server, err := d.DialContext(ctx, "tcp", target)
	if err != nil {
		return
	}
	if !l.track(server) {
		return
	}
	defer l.untrack(server)
	// The handshake: nothing flows before one round trip.
	if !l.handshake(ctx) {
		return
	}
	abort := func() {
		cancel()
		client.Close()
		server.Close()
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := l.pipe(ctx, client, server, direction{l.up, l.upQ, &l.bytesUp}); err != nil {
			abort()
		}
	}()
	go func() {
		defer wg.Done()
		if err := l.pipe(ctx, server, client, direction{l.down, l.downQ, &l.bytesDown}); err != nil {
			abort()
		}
	}()
	wg.Wait()
}

// direction is what one direction of a connection shares with the link.
type direction struct {
	lim     *rate.Limiter // ModelTokenBucket
	q       *bottleneck   // ModelFIFO
	counter *atomic.Int64
}

type segment struct {
	data []byte
	eof  bool
	at   time.Time // when the segment reaches the other end
}

var segmentPool = sync.Pool{New: func() any { b := make([]byte, segmentSize); return &b }}

// pipe copies src to dst through one direction of the link: a reader
// that paces each segment by the model and timestamps it, and a writer
// that releases each segment at its time. Under ModelTokenBucket the
// reader spends tokens and the segment arrives RTT/2 later; under
// ModelFIFO the reader waits for the congestion window, then for room in
// the bottleneck queue, and the segment arrives RTT/2 after its
// departure; the writer acknowledges it RTT/2 after writing it. A clean
// EOF is forwarded as a half-close after the delay.
func (l *Link) pipe(ctx context.Context, src, dst net.Conn, dir direction) error {
	delay := l.profile.RTT / 2
	var win *window
	if dir.q != nil {
		win = newWindow(l.profile.cwndCap())
	}
	q := make(chan segment, queueSegments)
	readErr := make(chan error, 1)
	go func() {
		defer close(q)
		timer := time.NewTimer(time.Hour)
		defer timer.Stop()
		for {
			size := int64(segmentSize)
			if win != nil {
				open, err := win.wait(ctx, timer)
				if err != nil {
					readErr <- err
					return
				}
				size = min(size, open)
			}
			bp := segmentPool.Get().(*[]byte)
			n, err := src.Read((*bp)[:size])
			if n > 0 {
				l.hold(int64(n))
				at := time.Now()
				switch {
				case dir.q != nil:
					storeMax(&l.peakInFlight, win.sent(int64(n)))
					admit, depart := dir.q.enqueue(at, int64(n))
					if !sleep(ctx, time.Until(admit)) {
						readErr <- ctx.Err()
						return
					}
					at = depart
				case dir.lim != nil:
					if werr := dir.lim.WaitN(ctx, n); werr != nil {
						readErr <- werr
						return
					}
					at = time.Now()
				}
				select {
				case q <- segment{data: (*bp)[:n], at: at.Add(delay)}:
				case <-ctx.Done():
					readErr <- ctx.Err()
					return
				}
			} else {
				segmentPool.Put(bp)
			}
			if err != nil {
				if errors.Is(err, io.EOF) {
					at := time.Now()
					if dir.q != nil {
						// The FIN leaves after the data queued before it.
						_, at = dir.q.enqueue(at, 0)
					}
					select {
					case q <- segment{eof: true, at: at.Add(delay)}:
						readErr <- nil
					case <-ctx.Done():
						readErr <- ctx.Err()
					}
					return
				}
				readErr <- err
				return
			}
		}
	}()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for seg := range q {
		if wait := time.Until(seg.at); wait > 0 {
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if seg.eof {
			closeWrite(dst)
			continue
		}
		n, err := dst.Write(seg.data)
		dir.counter.Add(int64(n))
		l.held.Add(-int64(len(seg.data)))
		if win != nil {
			// The acknowledgement leaves when the receiver has the
			// data, and takes half a round trip back.
			win.acked(later(seg.at, time.Now()).Add(delay), int64(len(seg.data)))
		}
		b := seg.data[:cap(seg.data)]
		segmentPool.Put(&b)
		if err != nil {
			return err
		}
	}
	return <-readErr
}

func (l *Link) hold(n int64) { storeMax(&l.peakHeld, l.held.Add(n)) }

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = c.Close()
}

func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
