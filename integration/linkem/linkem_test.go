package linkem

import (
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The tests check the link against what its profile implies: a transfer
// of N bytes cannot be faster than N/bandwidth, a round trip cannot be
// faster than the RTT. The upper bounds are loose (a loaded 2-core CI
// machine) and only catch a link that is far slower than its profile.

// server accepts connections and runs handle on each until the test ends.
func server(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return ln.Addr().String()
}

// sender writes n bytes to every connection, then closes it.
func sender(n int64) func(net.Conn) {
	return func(c net.Conn) {
		_, _ = io.CopyN(c, zeroReader{}, n)
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func proxy(t *testing.T, p Profile, target string) (*Link, string) {
	t.Helper()
	l := New(p)
	t.Cleanup(l.Stop)
	addr, err := l.Proxy("127.0.0.1:0", target)
	if err != nil {
		t.Fatal(err)
	}
	return l, addr.String()
}

// downloadInto reads everything from a new connection to addr, counting
// the bytes in n as they arrive.
func downloadInto(t *testing.T, addr string, n *atomic.Int64) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Error(err)
		return
	}
	defer c.Close()
	if _, err := io.Copy(counter{n}, c); err != nil {
		t.Error(err)
	}
}

type counter struct{ n *atomic.Int64 }

func (c counter) Write(p []byte) (int, error) {
	c.n.Add(int64(len(p)))
	return len(p), nil
}

// minDuration is the least time the link needs to move n bytes in one
// direction on a new connection. Under ModelTokenBucket: the one-way delay
// and the serialisation of everything beyond what the token bucket can
// hold (it fills up during the handshake). Under ModelFIFO: the handshake,
// the serialisation of all n bytes and the one-way delay.
func minDuration(p Profile, n int64) time.Duration {
	if p.Model == ModelFIFO {
		return p.RTT + seconds(float64(n)/p.BytesPerSecond()) + p.RTT/2
	}
	burst := int64(newLimiter(p).Burst())
	return p.RTT/2 + seconds(float64(n-burst)/p.BytesPerSecond())
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

// TestThroughput checks that the link delivers its rate, to one
// connection or shared by two, and that two connections share it fairly:
// when the first one is done, the other has most of its bytes too.
func TestThroughput(t *testing.T) {
	tests := []struct {
		name  string
		model Model
		conns int
		bytes int64 // per connection
	}{
		{"fifo one connection", ModelFIFO, 1, 3 << 20},
		{"fifo two connections share the cap", ModelFIFO, 2, 2 << 20},
		{"token bucket one connection", ModelTokenBucket, 1, 3 << 20},
		{"token bucket two connections share the cap", ModelTokenBucket, 2, 2 << 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := Profile{RTT: 20 * time.Millisecond, Bandwidth: 40_000_000, Model: tt.model} // 5 MB/s
			target := server(t, sender(tt.bytes))
			l, addr := proxy(t, p, target)
			start := time.Now()
			var wg sync.WaitGroup
			got := make([]atomic.Int64, tt.conns)
			// others[i] is what the other connections had received
			// when connection i was done.
			others := make([]int64, tt.conns)
			for i := range tt.conns {
				wg.Add(1)
				go func() {
					defer wg.Done()
					downloadInto(t, addr, &got[i])
					for j := range got {
						if j != i {
							others[i] += got[j].Load()
						}
					}
				}()
			}
			wg.Wait()
			elapsed := time.Since(start)
			total := tt.bytes * int64(tt.conns)
			for i := range got {
				if n := got[i].Load(); n != tt.bytes {
					t.Errorf("connection %d received %d bytes, want %d", i, n, tt.bytes)
				}
			}
			if s := l.Stats(); s.BytesDown != total || s.Connections != int64(tt.conns) {
				t.Errorf("stats %+v, want %d bytes down over %d connections", s, total, tt.conns)
			}
			lower := minDuration(p, total)
			upper := 4*lower + 2*time.Second
			rate := float64(total) * 8 / elapsed.Seconds() / 1e6
			t.Logf("%d bytes in %s (%.1f Mbit/s, cap %.1f)", total, elapsed, rate, float64(p.Bandwidth)/1e6)
			if elapsed < lower {
				t.Errorf("%d bytes took %s, faster than the link allows (%s)", total, elapsed, lower)
			}
			if elapsed > upper {
				t.Errorf("%d bytes took %s, far slower than the link's %s", total, elapsed, lower)
			}
			if tt.conns > 1 {
				first := slices.Min(others) // the first connection done saw the least of the others
				t.Logf("when the first connection was done, the others had %d bytes", first)
				if want := int64(tt.conns-1) * tt.bytes / 2; first < want {
					t.Errorf("when the first connection was done the others had %d bytes, want at least %d: unfair sharing", first, want)
				}
			}
		})
	}
}

func TestRoundTrip(t *testing.T) {
	p := Profile{RTT: 100 * time.Millisecond}
	echo := server(t, func(c net.Conn) { _, _ = io.Copy(c, c) })
	_, addr := proxy(t, p, echo)

	start := time.Now()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 1)
	for i := range 3 {
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
		if buf[0] != byte(i) {
			t.Fatalf("echo %d, want %d", buf[0], i)
		}
		elapsed := time.Since(start)
		// The first exchange pays the handshake too.
		want := p.RTT
		if i == 0 {
			want = 2 * p.RTT
		}
		t.Logf("round trip %d: %s", i, elapsed)
		if elapsed < want {
			t.Errorf("round trip %d took %s, less than %s", i, elapsed, want)
		}
		if elapsed > 10*want+2*time.Second {
			t.Errorf("round trip %d took %s, far more than %s", i, elapsed, want)
		}
		start = time.Now()
	}
}

// TestIntegrity sends random data both ways with a half-close in between,
// as an HTTP/1.0 client would.
func TestIntegrity(t *testing.T) {
	req := make([]byte, 300<<10)
	if _, err := rand.Read(req); err != nil {
		t.Fatal(err)
	}
	// The server answers with the request reversed, after reading it all.
	target := server(t, func(c net.Conn) {
		b, err := io.ReadAll(c)
		if err != nil {
			return
		}
		for i, j := 0, len(b)-1; i < j; i, j = i+1, j-1 {
			b[i], b[j] = b[j], b[i]
		}
		_, _ = c.Write(b)
	})
	l, addr := proxy(t, Profile{RTT: 10 * time.Millisecond, Bandwidth: 100_000_000}, target)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	resp, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	for i, j := 0, len(resp)-1; i < j; i, j = i+1, j-1 {
		resp[i], resp[j] = resp[j], resp[i]
	}
	if !bytes.Equal(req, resp) {
		t.Fatalf("data corrupted through the link (%d bytes sent, %d received)", len(req), len(resp))
	}
	if s := l.Stats(); s.BytesUp != int64(len(req)) || s.BytesDown != int64(len(req)) {
		t.Errorf("stats %+v, want %d each way", s, len(req))
	}
}

func TestStopClosesEverything(t *testing.T) {
	hold := make(chan struct{})
	target := server(t, func(c net.Conn) { <-hold })
	t.Cleanup(func() { close(hold) }) // runs before the server's cleanup
	l := New(Profile{RTT: time.Millisecond})
	addr, err := l.Proxy("127.0.0.1:0", target)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	done := make(chan struct{})
	go func() { l.Stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Stop did not return")
	}
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Error("read on a stopped link succeeded")
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Error("connection still open after Stop")
	}
	if c2, err := net.Dial("tcp", addr.String()); err == nil {
		c2.Close()
		t.Error("stopped link still accepts connections")
	}
	if _, err := l.Proxy("127.0.0.1:0", target); err == nil {
		t.Error("Proxy on a stopped link succeeded")
	}
}
