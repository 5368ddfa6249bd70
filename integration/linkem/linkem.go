// Package linkem is a userspace WAN link emulator: a TCP proxy that adds
// round-trip time and caps bandwidth. The kernel used for the tests has no
// netem, and a userspace link is also what lets the benchmark run on any
// machine without privileges.
//
// The model is a link with a fixed propagation delay and a serialisation
// rate:
//
//   - each direction has a delay line: a segment read from one side is
//     timestamped when it has been "serialised" and written to the other side
//     RTT/2 later, so throughput is limited by bandwidth, not by the delay
//     (many segments are in flight, as on a real long fat pipe);
//   - each direction has one token bucket shared by every connection of the
//     link, so parallel connections share the capacity as they would share
//     a WAN uplink;
//   - opening a connection costs one RTT (the TCP handshake) before data
//     flows.
package linkem

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// Profile describes a link.
type Profile struct {
	// RTT is the round-trip time added to the loopback's own.
	RTT time.Duration
	// Bandwidth is the capacity of each direction in bits per second;
	// zero means unlimited.
	Bandwidth int64
}

func (p Profile) String() string {
	bw := "unlimited"
	if p.Bandwidth > 0 {
		bw = fmt.Sprintf("%g Mbit/s", float64(p.Bandwidth)/1e6)
	}
	return fmt.Sprintf("rtt %s, %s", p.RTT, bw)
}

// BytesPerSecond is the bandwidth in bytes per second (0 if unlimited).
func (p Profile) BytesPerSecond() float64 { return float64(p.Bandwidth) / 8 }

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
}

// Link is an emulated link. Every proxy of a Link shares its bandwidth.
type Link struct {
	profile Profile
	up      *rate.Limiter // client → target; nil when unlimited
	down    *rate.Limiter // target → client

	bytesUp, bytesDown, conns atomic.Int64

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
		l.up = newLimiter(p)
		l.down = newLimiter(p)
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

// Profile returns the link's profile.
func (l *Link) Profile() Profile { return l.profile }

// Stats returns the link's counters.
func (l *Link) Stats() Stats {
	return Stats{BytesUp: l.bytesUp.Load(), BytesDown: l.bytesDown.Load(), Connections: l.conns.Load()}
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
	if !sleep(ctx, l.profile.RTT) {
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
		if err := l.pipe(ctx, client, server, l.up, &l.bytesUp); err != nil {
			abort()
		}
	}()
	go func() {
		defer wg.Done()
		if err := l.pipe(ctx, server, client, l.down, &l.bytesDown); err != nil {
			abort()
		}
	}()
	wg.Wait()
}

type segment struct {
	data []byte
	eof  bool
	at   time.Time // when the segment reaches the other end
}

var segmentPool = sync.Pool{New: func() any { b := make([]byte, segmentSize); return &b }}

// pipe copies src to dst through one direction of the link: a reader that
// spends tokens for each segment and timestamps it, and a writer that
// releases each segment after the one-way delay. A clean EOF is forwarded
// as a half-close after the delay.
func (l *Link) pipe(ctx context.Context, src, dst net.Conn, lim *rate.Limiter, counter *atomic.Int64) error {
	delay := l.profile.RTT / 2
	q := make(chan segment, queueSegments)
	readErr := make(chan error, 1)
	go func() {
		defer close(q)
		for {
			bp := segmentPool.Get().(*[]byte)
			n, err := src.Read(*bp)
			if n > 0 {
				if lim != nil {
					if werr := lim.WaitN(ctx, n); werr != nil {
						readErr <- werr
						return
					}
				}
				select {
				case q <- segment{data: (*bp)[:n], at: time.Now().Add(delay)}:
				case <-ctx.Done():
					readErr <- ctx.Err()
					return
				}
			} else {
				segmentPool.Put(bp)
			}
			if err != nil {
				if errors.Is(err, io.EOF) {
					select {
					case q <- segment{eof: true, at: time.Now().Add(delay)}:
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
		counter.Add(int64(n))
		b := seg.data[:cap(seg.data)]
		segmentPool.Put(&b)
		if err != nil {
			return err
		}
	}
	return <-readErr
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
