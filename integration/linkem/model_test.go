package linkem

import (
	"io"
	"math"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// The tests of ModelFIFO check the virtual accounting of the queue and
// the window exactly, and the proxy against lower bounds the model
// implies (a loaded machine only makes things slower) with generous upper
// bounds.

// TestBottleneck checks the queue's virtual time: departures in arrival
// order at the link rate, and senders held back while the buffer is full.
func TestBottleneck(t *testing.T) {
	// 1 MB/s: a byte takes 1 µs. BDP 50 kB, buffer 100 kB.
	p := Profile{RTT: 50 * time.Millisecond, Bandwidth: 8_000_000}
	if b := p.buffer(); b != 100_000 {
		t.Fatalf("buffer %d, want 100000", b)
	}
	const ms = time.Millisecond
	type seg struct {
		at            time.Duration // arrival
		n             int64
		admit, depart time.Duration // want
	}
	tests := []struct {
		name string
		segs []seg
		peak int64
	}{
		{"idle link", []seg{{0, 1000, 0, 1 * ms}}, 1000},
		{"back to back", []seg{{0, 1000, 0, 1 * ms}, {0, 1000, 0, 2 * ms}}, 2000},
		{"queue drained in between", []seg{{0, 1000, 0, 1 * ms}, {5 * ms, 1000, 5 * ms, 6 * ms}}, 1000},
		{"full buffer holds the sender back", []seg{
			{0, 30_000, 0, 30 * ms}, {0, 30_000, 0, 60 * ms}, {0, 30_000, 0, 90 * ms},
			// 90 kB queued: 30 kB fit once the queue is down to 70 kB.
			{0, 30_000, 20 * ms, 120 * ms},
			// Arrives later, waits behind the one held back.
			{1 * ms, 10_000, 30 * ms, 130 * ms},
		}, 100_000},
		{"small segment behind bulk data", []seg{
			{0, 30_000, 0, 30 * ms}, {0, 30_000, 0, 60 * ms},
			// 59 kB ahead of it: 59 ms in the queue.
			{1 * ms, 100, 1 * ms, 60*ms + 100*time.Microsecond},
		}, 60_000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newBottleneck(p)
			t0 := time.Now()
			for i, s := range tt.segs {
				admit, depart := b.enqueue(t0.Add(s.at), s.n)
				if !near(admit.Sub(t0), s.admit) || !near(depart.Sub(t0), s.depart) {
					t.Errorf("segment %d (%d bytes at %s): admitted at %s, leaves at %s; want %s, %s",
						i, s.n, s.at, admit.Sub(t0), depart.Sub(t0), s.admit, s.depart)
				}
			}
			if got := b.peakBytes(); got < tt.peak-1 || got > tt.peak || got > b.buffer {
				t.Errorf("peak queue %d bytes, want %d (buffer %d)", got, tt.peak, b.buffer)
			}
		})
	}
}

// near is equality up to the nanosecond rounding of durations.
func near(a, b time.Duration) bool { return a-b < 10 && b-a < 10 }

// TestWindow checks slow start on the window's own accounting: each
// round trip's acknowledgements double the window, up to the cap.
func TestWindow(t *testing.T) {
	const limit = 8 * initCwnd
	w := newWindow(limit)
	t0 := time.Now()
	open, next := w.poll(t0)
	if open != initCwnd || !next.IsZero() {
		t.Fatalf("new window: open %d, next ack %v; want %d, none", open, next, initCwnd)
	}
	want := []int64{2 * initCwnd, 4 * initCwnd, 8 * initCwnd, 8 * initCwnd}
	for round, cwnd := range want {
		now := t0.Add(time.Duration(round) * time.Second)
		open, _ := w.poll(now)
		// Send the whole window in two halves, acknowledged a round
		// trip (here 1 s) later.
		for _, n := range []int64{open / 2, open - open/2} {
			w.sent(n)
			w.acked(now.Add(time.Second), n)
		}
		if open, next := w.poll(now); open != 0 || !next.Equal(now.Add(time.Second)) {
			t.Fatalf("round %d: window spent, open %d, next ack %v", round, open, next)
		}
		if open, _ := w.poll(now.Add(time.Second)); open != cwnd {
			t.Errorf("round %d: open window %d after the acks, want %d", round, open, cwnd)
		}
	}
}

// echoServer answers every byte with itself.
func echoServer(t *testing.T) string {
	return server(t, func(c net.Conn) { _, _ = io.Copy(c, c) })
}

// exchange sends a byte on c and waits for its echo.
func exchange(t *testing.T, c net.Conn) time.Duration {
	t.Helper()
	start := time.Now()
	if _, err := c.Write([]byte{1}); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	return time.Since(start)
}

// TestQueueing is a small request/response started on a second
// connection while a bulk stream saturates the link, as a startup read
// racing a bundle stream: under ModelFIFO the response waits behind the
// bulk data queued before it, under ModelTokenBucket it overtakes.
func TestQueueing(t *testing.T) {
	for _, model := range []Model{ModelFIFO, ModelTokenBucket} {
		t.Run(model.String(), func(t *testing.T) {
			// 5 MB/s, BDP 200 kB, buffer 400 kB: 80 ms of queue.
			p := Profile{RTT: 40 * time.Millisecond, Bandwidth: 40_000_000, Model: model}
			l := New(p)
			t.Cleanup(l.Stop)
			bulkAddr, err := l.Proxy("127.0.0.1:0", server(t, sender(1<<40)))
			if err != nil {
				t.Fatal(err)
			}
			echoAddr, err := l.Proxy("127.0.0.1:0", echoServer(t))
			if err != nil {
				t.Fatal(err)
			}
			bulk, err := net.Dial("tcp", bulkAddr.String())
			if err != nil {
				t.Fatal(err)
			}
			defer bulk.Close()
			var got atomic.Int64
			go func() { _, _ = io.Copy(counter{&got}, bulk) }()
			// Past slow start, the stream keeps the queue full.
			deadline := time.Now().Add(30 * time.Second)
			for got.Load() < 1<<20 {
				if time.Now().After(deadline) {
					t.Fatalf("bulk stream stuck at %d bytes", got.Load())
				}
				time.Sleep(10 * time.Millisecond)
			}

			c, err := net.Dial("tcp", echoAddr.String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			first := exchange(t, c) // pays the handshake
			second := exchange(t, c)
			queue := seconds(float64(p.buffer()) / p.BytesPerSecond())
			s := l.Stats()
			t.Logf("first exchange (with the handshake) %s, second %s; queue of a full buffer %s; bulk delivered %d bytes, peak queue down %d bytes",
				first, second, queue, got.Load(), s.PeakQueueDown)
			if second < p.RTT {
				t.Errorf("exchange took %s, less than the RTT %s", second, p.RTT)
			}
			switch model {
			case ModelFIFO:
				// At least half the buffer was queued ahead of the
				// response (the stream keeps it full).
				if want := p.RTT + queue/2; second < want {
					t.Errorf("exchange behind a bulk stream took %s, want at least RTT + half a buffer's queue = %s", second, want)
				}
				if s.PeakQueueDown < p.buffer()/2 || s.PeakQueueDown > p.buffer() {
					t.Errorf("peak queue %d bytes, want the buffer (%d) about full", s.PeakQueueDown, p.buffer())
				}
			case ModelTokenBucket:
				if want := p.RTT + queue; second > want {
					t.Errorf("exchange took %s, the token bucket should let it overtake (want under %s)", second, want)
				}
			}
		})
	}
}

// slowStartBound is the least time ModelFIFO needs to deliver n bytes on
// a new connection. A byte is acknowledged at least a round trip after it
// was sent and the window is initcwnd plus the bytes acknowledged, so by
// r round trips after the first send at most S_r = initcwnd·(2^(r+1) - 1)
// bytes were sent; the rest still needs to be serialised after that. Add
// the handshake before and the one-way delay after.
func slowStartBound(p Profile, n int64) time.Duration {
	var worst time.Duration
	for r := 0; ; r++ {
		sent := float64(initCwnd) * (math.Exp2(float64(r+1)) - 1)
		left := max(0, float64(n)-sent)
		worst = max(worst, time.Duration(r)*p.RTT+seconds(left/p.BytesPerSecond()))
		if left == 0 {
			break
		}
	}
	return p.RTT + worst + p.RTT/2
}

// TestSlowStart checks that a fresh connection ramps up: moving N bytes
// takes round trips beyond RTT + N/rate.
func TestSlowStart(t *testing.T) {
	// 12.5 MB/s, BDP 500 kB: about log2(500/14.6) = 5 rounds to fill.
	p := Profile{RTT: 40 * time.Millisecond, Bandwidth: 100_000_000}
	const n = 2 << 20
	lower := slowStartBound(p, n)
	flat := minDuration(p, n)
	if lower-flat < 2*p.RTT {
		t.Fatalf("slow start bound %s is not 2 RTTs above %s: the test proves nothing", lower, flat)
	}
	l, addr := proxy(t, p, server(t, sender(n)))
	var got atomic.Int64
	start := time.Now()
	downloadInto(t, addr, &got)
	elapsed := time.Since(start)
	if got.Load() != n {
		t.Fatalf("received %d bytes, want %d", got.Load(), n)
	}
	t.Logf("%d bytes in %s: %.1f RTTs beyond the handshake + N/rate + RTT/2 = %s (bound %.1f RTTs); peak in flight %d",
		n, elapsed, float64(elapsed-flat)/float64(p.RTT), flat, float64(lower-flat)/float64(p.RTT), l.Stats().PeakInFlight)
	if elapsed < lower {
		t.Errorf("took %s, faster than slow start allows (%s)", elapsed, lower)
	}
	if upper := flat + time.Duration(math.Log2(n/initCwnd)+2)*p.RTT + 2*time.Second; elapsed > upper {
		t.Errorf("took %s, far slower than slow start's %s", elapsed, lower)
	}
}

// TestWindowCap checks that the window cap bounds the bytes in flight,
// hence one connection's rate: cap/RTT.
func TestWindowCap(t *testing.T) {
	// BDP 500 kB, cap 125 kB: a quarter of the link's rate.
	p := Profile{RTT: 40 * time.Millisecond, Bandwidth: 100_000_000, CwndCapBDP: 0.25}
	limit := p.cwndCap()
	const n = 1 << 20
	// By r round trips after the first send at most (r+1)·cap bytes
	// were sent.
	rounds := (n+limit-1)/limit - 1
	lower := p.RTT + time.Duration(rounds)*p.RTT + p.RTT/2
	if free := slowStartBound(Profile{RTT: p.RTT, Bandwidth: p.Bandwidth}, n); lower < free+p.RTT {
		t.Fatalf("cap bound %s is not above the uncapped %s: the test proves nothing", lower, free)
	}
	l, addr := proxy(t, p, server(t, sender(n)))
	var got atomic.Int64
	start := time.Now()
	downloadInto(t, addr, &got)
	elapsed := time.Since(start)
	s := l.Stats()
	t.Logf("%d bytes in %s (bound %s), peak in flight %d bytes, cap %d", got.Load(), elapsed, lower, s.PeakInFlight, limit)
	if got.Load() != n {
		t.Fatalf("received %d bytes, want %d", got.Load(), n)
	}
	if s.PeakInFlight > limit || s.PeakInFlight < limit/2 {
		t.Errorf("peak in flight %d bytes, want up to the cap %d", s.PeakInFlight, limit)
	}
	if elapsed < lower {
		t.Errorf("took %s, faster than a %d-byte window allows (%s)", elapsed, limit, lower)
	}
	if upper := 4*lower + 2*time.Second; elapsed > upper {
		t.Errorf("took %s, far slower than %s", elapsed, lower)
	}
}

// TestBackPressure checks the emulator's memory: the queue never holds
// more than its buffer, and a receiver that does not read stops its
// sender once the window is spent.
func TestBackPressure(t *testing.T) {
	p := Profile{RTT: 20 * time.Millisecond, Bandwidth: 40_000_000} // buffer 200 kB, cap 400 kB
	t.Run("parallel streams", func(t *testing.T) {
		const conns, n = 3, 1 << 20
		l, addr := proxy(t, p, server(t, sender(n)))
		got := make([]atomic.Int64, conns)
		done := make(chan struct{})
		for i := range conns {
			go func() { downloadInto(t, addr, &got[i]); done <- struct{}{} }()
		}
		for range conns {
			<-done
		}
		s := l.Stats()
		t.Logf("peak queue down %d bytes (buffer %d), peak held %d bytes", s.PeakQueueDown, p.buffer(), l.peakHeld.Load())
		if s.BytesDown != conns*n {
			t.Errorf("delivered %d bytes, want %d", s.BytesDown, conns*n)
		}
		if s.PeakQueueDown > p.buffer() || s.PeakQueueDown < p.buffer()/2 {
			t.Errorf("peak queue %d bytes, want up to the buffer %d", s.PeakQueueDown, p.buffer())
		}
		if h := l.peakHeld.Load(); h > conns*p.cwndCap() {
			t.Errorf("held %d bytes, more than %d connections' windows", h, conns)
		}
	})
	t.Run("receiver not reading", func(t *testing.T) {
		// More than the socket buffers on both sides can take.
		const n = 64 << 20
		l, addr := proxy(t, p, server(t, sender(n)))
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// Wait until the link stops delivering: the writer is stuck
		// on the full socket.
		deadline := time.Now().Add(30 * time.Second)
		last := int64(-1)
		for {
			time.Sleep(200 * time.Millisecond)
			d := l.Stats().BytesDown
			if d == last && d > 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("link still delivering (%d bytes) to a receiver that does not read", d)
			}
			last = d
		}
		held := l.held.Load()
		t.Logf("stalled after %d bytes delivered; the emulator holds %d bytes (window cap %d)", last, held, p.cwndCap())
		if held > p.cwndCap() || l.peakHeld.Load() > p.cwndCap() {
			t.Errorf("emulator holds %d bytes (peak %d) for a stalled receiver, more than the window cap %d", held, l.peakHeld.Load(), p.cwndCap())
		}
	})
}
