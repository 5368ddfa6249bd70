package store

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/starlight-project/starlight/api/bundle"
)

// Progress reports how far the reception of a bundle is. Frame and byte
// counts include the frames an earlier, broken stream delivered before the
// resume point, so they always relate to the whole bundle.
type Progress struct {
	Frames      int   // frames received
	FramesTotal int   // frames in the bundle
	Bytes       int64 // compressed bytes received
	BytesTotal  int64 // compressed bytes in the bundle
	Contents    int   // contents completed by this stream
	// ContentsTotal is the number of distinct contents this stream
	// carries frames for.
	ContentsTotal int
}

// Receive stores every frame of a bundle stream. It first registers the
// contents the frames carry (see ExpectHeader), then decodes and writes the
// frames in stream order, calling progress (if not nil) after each.
//
// On a corrupt or truncated stream, or when ctx is done, it returns the
// error and leaves the contents that did not complete pending: what arrived
// stays verified and readable, nothing is failed, and a resumed bundle
// (api.DeltaRequest.Resume = Progress.Frames) fills the rest. Whether to
// give up on them (FailPending) is the caller's decision.
//
// A resumed stream (Resume > 0) does not re-arm a content that failed
// (its whole file did not match its digest, or the store could not write
// it): the frames of it before the resume point would not come again, so
// Receive fails with that content's error instead.
func (s *Store) Receive(ctx context.Context, br *bundle.Reader, progress func(Progress)) error {
	h := br.Header()
	if err := s.expectHeader(h, h.Resume == 0); err != nil {
		return fmt.Errorf("receiving bundle: %w", err)
	}
	p := Progress{Frames: h.Resume, FramesTotal: len(h.Frames)}
	seen := make(map[string]bool)
	for i, f := range h.Frames {
		p.BytesTotal += f.CompressedSize
		if i < h.Resume {
			p.Bytes += f.CompressedSize
		} else if !seen[f.Digest] {
			seen[f.Digest] = true
			p.ContentsTotal++
		}
	}
	if progress != nil {
		progress(p)
	}
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("receiving bundle: %w", err)
		}
		if gate := s.frameGate; gate != nil {
			gate(ctx)
		}
		idx := br.Index()
		f, raw, err := br.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("receiving bundle frame %d: %w", idx, err)
		}
		data, err := bundle.Decode(f, ctxReader{ctx, raw})
		if err != nil {
			return fmt.Errorf("receiving bundle frame %d: %w", idx, err)
		}
		completed, err := s.writeChunk(f, data)
		if err != nil {
			if cerr := ctx.Err(); cerr != nil {
				// The decoder reports the interrupted read as a
				// corrupt frame; the cause is the cancellation.
				err = cerr
			}
			return fmt.Errorf("receiving bundle frame %d: %w", idx, err)
		}
		p.Frames++
		p.Bytes += f.CompressedSize
		if completed {
			p.Contents++
		}
		if progress != nil {
			progress(p)
		}
	}
}

// ctxReader stops a read of the stream as soon as ctx is done, even if the
// underlying reader does not watch ctx.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (r ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}
