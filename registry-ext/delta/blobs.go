package delta

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/opencontainers/go-digest"
)

const (
	// openBlobs bounds the blobs one stream keeps open. Frames in layer
	// then TOC order touch one blob at a time; trace order hops between a
	// few, and an image rarely has more than a handful of hot layers.
	openBlobs = 8
	// readAhead is the buffer of each open blob: contiguous frames (the
	// common case, since members follow each other in the blob) are read
	// in large sequential reads instead of one small read per member.
	readAhead = 256 << 10
)

// openBlob is a layer blob being read sequentially from pos.
type openBlob struct {
	dgst digest.Digest
	rc   io.ReadSeekCloser
	br   *bufio.Reader
	pos  int64 // blob offset of the next byte br returns
	used uint64
}

// blobCache keeps the most recently used blobs of one stream open, so a
// stream seeks instead of reopening a blob per frame. It is not safe for
// concurrent use: one stream, one goroutine.
type blobCache struct {
	opener     BlobOpener
	repository string
	blobs      []*openBlob
	clock      uint64
}

func newBlobCache(opener BlobOpener, repository string) *blobCache {
	return &blobCache{opener: opener, repository: repository}
}

// reader returns a reader positioned at offset of blob dgst.
func (c *blobCache) reader(ctx context.Context, dgst digest.Digest, offset int64) (io.Reader, error) {
	b, err := c.get(ctx, dgst)
	if err != nil {
		return nil, err
	}
	if b.pos != offset {
		// A short forward hop is cheaper to read through than to seek
		// (a seek on a remote storage driver is a new ranged request).
		if skip := offset - b.pos; skip > 0 && skip <= int64(b.br.Buffered()) {
			if _, err := b.br.Discard(int(skip)); err != nil {
				return nil, fmt.Errorf("reading blob %s: %w", dgst, err)
			}
		} else {
			if _, err := b.rc.Seek(offset, io.SeekStart); err != nil {
				return nil, fmt.Errorf("seeking blob %s to %d: %w", dgst, offset, err)
			}
			b.br.Reset(b.rc)
		}
		b.pos = offset
	}
	return &posReader{b: b}, nil
}

func (c *blobCache) get(ctx context.Context, dgst digest.Digest) (*openBlob, error) {
	c.clock++
	for _, b := range c.blobs {
		if b.dgst == dgst {
			b.used = c.clock
			return b, nil
		}
	}
	rc, err := c.opener.OpenBlob(ctx, c.repository, dgst)
	if err != nil {
		return nil, fmt.Errorf("opening blob %s: %w", dgst, err)
	}
	b := &openBlob{dgst: dgst, rc: rc, br: bufio.NewReaderSize(rc, readAhead), used: c.clock}
	if len(c.blobs) < openBlobs {
		c.blobs = append(c.blobs, b)
		return b, nil
	}
	lru := 0
	for i, o := range c.blobs {
		if o.used < c.blobs[lru].used {
			lru = i
		}
	}
	// A close error of a read-only handle changes nothing for the stream.
	_ = c.blobs[lru].rc.Close()
	c.blobs[lru] = b
	return b, nil
}

// Close closes every open blob.
func (c *blobCache) Close() error {
	var errs []error
	for _, b := range c.blobs {
		errs = append(errs, b.rc.Close())
	}
	c.blobs = nil
	return errors.Join(errs...)
}

// posReader reads an open blob and keeps its position up to date.
type posReader struct{ b *openBlob }

func (r *posReader) Read(p []byte) (int, error) {
	n, err := r.b.br.Read(p)
	r.b.pos += int64(n)
	return n, err
}
