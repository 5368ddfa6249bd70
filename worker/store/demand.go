package store

import (
	"context"
	"sort"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

// DemandAhead is how many bytes (uncompressed) past the end of a blocked
// read a demand asks for, in whole chunks, when the read looks sequential:
// a reader that blocks on the start of a file, or right after a part it
// already has, usually goes on reading. A read elsewhere (a page fault in
// a large mapped binary, a lookup in a large archive) asks for its own
// chunks only.
const DemandAhead = 1 << 20

// A Demand names the chunks of a content that a reader is blocked on:
// the missing chunks that overlap its read, followed, for a sequential
// read, by the missing chunks up to DemandAhead bytes past it, in file
// order. None of them is being written when the demand is made.
type Demand struct {
	Digest digest.Digest
	Chunks []api.Chunk
}

// SetDemandHandler installs fn, called when a read has to wait for chunks
// that nobody is writing yet (see Demand), so that a fetcher can bring them
// ahead of the bundle stream. fn is called without the store's locks held,
// once per blocked ReadAt, and must not block; the chunks it fetches go in
// through WriteChunk like any other. Set it before the store is used.
func (s *Store) SetDemandHandler(fn func(Demand)) { s.demand = fn }

// SetFrameGate installs fn, called by Receive before it reads each frame
// of a bundle stream. A fetcher uses it to hold the stream back while
// on-demand fetches are in flight: the stream's connection then stops
// (flow control) and leaves the link to what a reader waits for. It is
// called between frames, never while a chunk is being written, and must
// return when ctx is done. Set it before the store is used.
func (s *Store) SetFrameGate(fn func(ctx context.Context)) { s.frameGate = fn }

// demandLocked returns the chunks a read of [off, end) of c blocked on asks
// for. s.mu must be held.
func (c *content) demandLocked(off, end int64) []api.Chunk {
	i := sort.Search(len(c.chunks), func(i int) bool { return c.chunks[i].Offset+c.chunks[i].Size > off })
	var out []api.Chunk
	limit := end
	if i == 0 || c.have[i-1] {
		limit += DemandAhead
	}
	for ; i < len(c.chunks) && c.chunks[i].Offset < limit; i++ {
		if c.have[i] || c.busy[i] {
			if c.chunks[i].Offset >= end {
				break // ahead of the read: stop at the first chunk in or arriving
			}
			continue
		}
		out = append(out, c.chunks[i])
	}
	return out
}
