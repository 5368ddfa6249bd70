package remote

import (
	"context"
	"io"
	"time"
)

// idleReader cancels the request when no byte arrives for d (d <= 0: no
// limit), and when it is closed.
type idleReader struct {
	rc     io.ReadCloser
	cancel context.CancelFunc
	timer  *time.Timer
	d      time.Duration
}

func newIdleReader(rc io.ReadCloser, cancel context.CancelFunc, d time.Duration) *idleReader {
	ir := &idleReader{rc: rc, cancel: cancel, d: d}
	if d > 0 {
		ir.timer = time.AfterFunc(d, cancel)
	}
	return ir
}

func (ir *idleReader) Read(p []byte) (int, error) {
	n, err := ir.rc.Read(p)
	if n > 0 && ir.timer != nil {
		ir.timer.Reset(ir.d)
	}
	return n, err
}

func (ir *idleReader) Close() error {
	if ir.timer != nil {
		ir.timer.Stop()
	}
	ir.cancel()
	return ir.rc.Close()
}
