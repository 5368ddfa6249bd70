package delta

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
)

// prepared is a plan ready to stream to any number of clients: the header
// encoded once (bundle.EncodedHeader) and the sources of the frames in
// stream order, both in a spool file, plus the few numbers a stream needs
// before its first byte. It holds no tree: the trees of an image of
// 100,000 files (a few hundred megabytes in memory while Plan runs) become
// a few megabytes of temporary disk and a few hundred bytes of memory.
//
// The spool file is unlinked as soon as it is created, so nothing is left
// behind whatever happens to the process; it is closed when the last
// stream reading it and the plan cache let go of it (planCache).
type prepared struct {
	key    string
	header *bundle.EncodedHeader
	stats  api.BundleStats
	frames int
	layers []digest.Digest // the sources' layers, by index
	file   *os.File        // header prefix, then frames × sourceRecord
	srcAt  int64           // offset of the first source record
	size   int64           // bytes of the spool file

	// Guarded by planCache.mu.
	refs    int
	cached  bool
	expires int64 // unix nanoseconds; the cache answers the plan until then
}

// sourceRecord is a frame's source in the spool: the layer's index in
// prepared.layers (uint32), the member's offset and size (int64 each).
const sourceRecord = 4 + 8 + 8

// prepare plans the bundle of manifestDigest for a worker holding have
// (validated and without duplicates) and spools it for header version
// version. Plan's trees are garbage once prepare returns.
func (p *Planner) prepare(ctx context.Context, key, repository string, manifestDigest digest.Digest, have []string, version int) (*prepared, error) {
	h, sources, err := p.Plan(ctx, repository, manifestDigest, api.DeltaRequest{Have: have})
	if err != nil {
		return nil, err
	}
	f, err := spoolFile(p.limits.SpoolDir)
	if err != nil {
		return nil, err
	}
	pr := &prepared{key: key, stats: h.Stats, frames: len(sources), file: f}
	if err := pr.write(h, sources, version); err != nil {
		f.Close()
		return nil, fmt.Errorf("spooling the plan of %s: %w", manifestDigest, err)
	}
	return pr, nil
}

func (pr *prepared) write(h *api.BundleHeader, sources []Source, version int) error {
	bw := bufio.NewWriterSize(pr.file, 256<<10)
	eh, err := bundle.EncodeHeader(bw, h, version)
	if err != nil {
		return err
	}
	pr.header, pr.srcAt = eh, eh.Size()
	index := make(map[digest.Digest]uint32, len(h.Layers))
	var rec [sourceRecord]byte
	for _, s := range sources {
		li, ok := index[s.Layer]
		if !ok {
			li = uint32(len(pr.layers))
			index[s.Layer] = li
			pr.layers = append(pr.layers, s.Layer)
		}
		binary.BigEndian.PutUint32(rec[0:], li)
		binary.BigEndian.PutUint64(rec[4:], uint64(s.Offset))
		binary.BigEndian.PutUint64(rec[12:], uint64(s.Size))
		if _, err := bw.Write(rec[:]); err != nil {
			return err
		}
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	pr.size = pr.srcAt + int64(len(sources))*sourceRecord
	return nil
}

// writeHeader writes the bundle's magic and header for a stream starting
// at frame resume.
func (pr *prepared) writeHeader(w io.Writer, resume int) (int64, error) {
	return pr.header.WriteTo(w, io.NewSectionReader(pr.file, 0, pr.header.Size()), resume)
}

// sources returns the sources of frames [from, frames) in stream order.
func (pr *prepared) sources(from int) *sourceReader {
	off := pr.srcAt + int64(from)*sourceRecord
	sr := io.NewSectionReader(pr.file, off, pr.size-off)
	return &sourceReader{r: bufio.NewReaderSize(sr, 32<<10), layers: pr.layers}
}

// sourceReader reads source records from a spool.
type sourceReader struct {
	r      *bufio.Reader
	layers []digest.Digest
	rec    [sourceRecord]byte
}

func (s *sourceReader) next() (Source, error) {
	if _, err := io.ReadFull(s.r, s.rec[:]); err != nil {
		return Source{}, fmt.Errorf("reading the plan spool: %w", err)
	}
	li := binary.BigEndian.Uint32(s.rec[0:])
	if int(li) >= len(s.layers) {
		return Source{}, fmt.Errorf("plan spool: layer %d of %d", li, len(s.layers))
	}
	return Source{
		Layer:  s.layers[li],
		Offset: int64(binary.BigEndian.Uint64(s.rec[4:])),
		Size:   int64(binary.BigEndian.Uint64(s.rec[12:])),
	}, nil
}

// spoolFile creates a temporary file in dir (os.TempDir() when "") and
// unlinks it at once: it lives as long as it is open.
func spoolFile(dir string) (*os.File, error) {
	f, err := os.CreateTemp(dir, "starlight-plan-*")
	if err != nil {
		return nil, fmt.Errorf("creating a plan spool: %w", err)
	}
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, fmt.Errorf("unlinking the plan spool: %w", err)
	}
	return f, nil
}
