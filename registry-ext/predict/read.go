package predict

import (
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"sort"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

var errBudget = errors.New("read budget exhausted")

// reader reads ranges of one regular file of the image from its converted
// layer blob: each chunk is an independent gzip member, decompressed from
// its start only as far as a read needs. What was decompressed is kept
// until close, so the ELF parser's hops between the headers, the dynamic
// section and the string table cost one decompression of each chunk.
type reader struct {
	p      *predictor
	blob   digest.Digest
	f      *file
	chunks map[int]*chunkState
	used   int64 // bytes decompressed for this file
}

type chunkState struct {
	rc   io.ReadSeekCloser
	zr   *gzip.Reader
	data []byte // decompressed prefix of the chunk
	err  error  // sticky: the member ended or failed
}

func (p *predictor) reader(f *file) *reader {
	return &reader{p: p, blob: digest.Digest(p.tree.layers[f.layer].Digest), f: f, chunks: map[int]*chunkState{}}
}

func (r *reader) size() int64 { return r.f.content.Size }

// readAt returns up to n bytes of the file at off, fewer at its end.
func (r *reader) readAt(off int64, n int) ([]byte, error) {
	size := r.size()
	if off < 0 || n < 0 {
		return nil, fmt.Errorf("read at %d", off)
	}
	if off >= size || n == 0 {
		return nil, nil
	}
	end := min(off+int64(n), size)
	chunks := r.f.content.Chunks
	out := make([]byte, 0, end-off)
	for off < end {
		i := sort.Search(len(chunks), func(i int) bool { return chunks[i].Offset+chunks[i].Size > off })
		if i == len(chunks) || chunks[i].Offset > off {
			return out, fmt.Errorf("%s: no chunk holds offset %d", r.f.name, off)
		}
		c := &chunks[i]
		want := min(end, c.Offset+c.Size) - c.Offset
		data, err := r.inflate(i, c, want)
		if err != nil {
			return out, err
		}
		out = append(out, data[off-c.Offset:want]...)
		off = c.Offset + want
	}
	return out, nil
}

// inflate returns the first want bytes of chunk i.
func (r *reader) inflate(i int, c *api.Chunk, want int64) ([]byte, error) {
	s := r.chunks[i]
	if s == nil {
		s = &chunkState{}
		r.chunks[i] = s
	}
	for int64(len(s.data)) < want {
		if s.err != nil {
			return nil, fmt.Errorf("%s: chunk at %d: %w", r.f.name, c.Offset, s.err)
		}
		if s.zr == nil {
			if err := r.openChunk(s, c); err != nil {
				s.err = err
				continue
			}
		}
		step := min(want-int64(len(s.data)), 64<<10)
		if r.used+step > r.p.lim.FileBytes || r.p.used+step > r.p.lim.Bytes {
			return nil, errBudget
		}
		buf := make([]byte, step)
		n, err := io.ReadFull(s.zr, buf)
		s.data = append(s.data, buf[:n]...)
		r.used += int64(n)
		r.p.used += int64(n)
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				err = io.ErrUnexpectedEOF // the member is shorter than the chunk
			}
			s.err = err
		}
	}
	return s.data, nil
}

func (r *reader) openChunk(s *chunkState, c *api.Chunk) error {
	if err := r.p.ctx.Err(); err != nil {
		return err
	}
	rc, err := r.p.blobs.OpenBlob(r.p.ctx, r.p.repository, r.blob)
	if err != nil {
		r.p.blobErr = errors.Join(r.p.blobErr, err)
		return err
	}
	if _, err := rc.Seek(c.CompressedOffset, io.SeekStart); err != nil {
		rc.Close()
		return err
	}
	var src io.Reader = rc
	if c.CompressedSize > 0 {
		src = io.LimitReader(rc, c.CompressedSize)
	}
	zr, err := gzip.NewReader(src)
	if err != nil {
		rc.Close()
		return err
	}
	zr.Multistream(false)
	s.rc, s.zr = rc, zr
	return nil
}

// close releases the blobs and the decompressed data.
func (r *reader) close() {
	for _, s := range r.chunks {
		if s.rc != nil {
			_ = s.rc.Close() // read only
		}
	}
	r.chunks = nil
}
