// Package trace records startup traces: which files a container reads, in
// which order, and when. A Recorder belongs to one container; its hooks
// are bound to that container's private FUSE views of its image's layers
// (package fs), so every access it sees is that container's. A Dir keeps
// the recorded traces on disk until they are reported to the registry.
package trace

import (
	"sort"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
)

// DefaultMaxAccesses bounds the accesses one recorder keeps, so that a
// container that walks a huge image cannot grow the worker without limit.
// Later first accesses are counted as dropped. It is the most a registry
// accepts in one report.
const DefaultMaxAccesses = api.MaxTraceAccesses

// Layer indexes one layer's tree for the recorder: the content digest and
// chunk offsets of every regular file, by entry name. It is read-only once
// built and may be shared by the recorders of many containers.
type Layer struct {
	digest string
	files  map[string]fileInfo
}

type fileInfo struct {
	digest string
	// chunks are the chunk start offsets, ascending; empty for a file
	// with no content or a single chunk.
	chunks []int64
}

// NewLayer indexes tree.
func NewLayer(tree *api.LayerTree) *Layer {
	l := &Layer{digest: tree.Digest, files: make(map[string]fileInfo)}
	for i := range tree.Entries {
		e := &tree.Entries[i]
		if e.Type != api.TypeReg {
			continue
		}
		fi := fileInfo{digest: e.Digest}
		if len(e.Chunks) > 1 {
			fi.chunks = make([]int64, len(e.Chunks))
			for j, c := range e.Chunks {
				fi.chunks[j] = c.Offset
			}
		}
		// A later entry of the same name replaces an earlier one, as
		// in the view.
		l.files[e.Name] = fi
	}
	return l
}

// Digest returns the layer digest.
func (l *Layer) Digest() string { return l.digest }

// key identifies a recorded access: a file of a layer, and the chunk.
type key struct {
	layer, name string
	chunk       int64
}

// Recorder records the first access of every file (and of every chunk of a
// file read through FUSE) of one container, with its time since Start. It
// is safe for concurrent use; its methods are called on FUSE request
// paths, so they only take a mutex and touch a map.
type Recorder struct {
	mu       sync.Mutex
	start    time.Time
	now      func() time.Time
	max      int
	seen     map[key]struct{}
	accesses []api.TraceAccess
	dropped  int
	sealed   bool
	version  uint64 // bumped on every recorded access
}

// NewRecorder returns a recorder whose clock starts at start.
func NewRecorder(start time.Time) *Recorder {
	return &Recorder{start: start, now: time.Now, max: DefaultMaxAccesses, seen: make(map[key]struct{})}
}

// SetMax changes the bound on recorded accesses (tests).
func (r *Recorder) SetMax(n int) {
	r.mu.Lock()
	r.max = n
	r.mu.Unlock()
}

// SetClock replaces time.Now (tests).
func (r *Recorder) SetClock(now func() time.Time) {
	r.mu.Lock()
	r.now = now
	r.mu.Unlock()
}

// Restart moves the start of the clock to t if nothing was recorded yet:
// a container's rootfs is prepared when the container is created, but its
// first process may start much later, when its rootfs is mounted.
func (r *Recorder) Restart(t time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.accesses) == 0 && r.dropped == 0 {
		r.start = t
	}
}

// Start returns the time accesses are measured from.
func (r *Recorder) Start() time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.start
}

// Open records the opening of the file name of layer l: its first access
// (chunk 0).
func (r *Recorder) Open(l *Layer, name string) {
	fi, ok := l.files[name]
	if !ok {
		return // not a regular file of the tree: nothing the registry knows
	}
	r.mu.Lock()
	r.record(l, name, fi.digest, 0)
	r.mu.Unlock()
}

// Read records a read of [off, off+size) of the file name of layer l: the
// first access of every chunk it covers. Chunk 0 is the file's first
// access, which Open records already.
func (r *Recorder) Read(l *Layer, name string, off, size int64) {
	fi, ok := l.files[name]
	if !ok || len(fi.chunks) == 0 || size <= 0 || off < 0 {
		return
	}
	end := off + size
	// The chunk containing off: the last one starting at or before it.
	i := sort.Search(len(fi.chunks), func(i int) bool { return fi.chunks[i] > off }) - 1
	i = max(i, 0)
	r.mu.Lock()
	defer r.mu.Unlock()
	for ; i < len(fi.chunks) && fi.chunks[i] < end; i++ {
		r.record(l, name, fi.digest, fi.chunks[i])
	}
}

// record appends an access if it is the first of its key. r.mu is held.
func (r *Recorder) record(l *Layer, name, content string, chunk int64) {
	if r.sealed {
		return
	}
	k := key{l.digest, name, chunk}
	if _, ok := r.seen[k]; ok {
		return
	}
	if len(r.accesses) >= r.max {
		r.dropped++
		return
	}
	r.seen[k] = struct{}{}
	t := r.now().Sub(r.start)
	// The clock may have been restarted after a read of the prepare
	// phase (e.g. an image config check); never report negative times.
	t = max(t, 0)
	r.accesses = append(r.accesses, api.TraceAccess{
		Layer: l.digest, Name: name, Digest: content, ChunkOffset: chunk, TimeNS: int64(t),
	})
	r.version++
}

// Seal stops recording: later accesses are ignored. It returns the trace
// recorded up to now.
func (r *Recorder) Seal() Snapshot {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sealed = true
	return r.snapshotLocked()
}

// Sealed reports whether Seal was called.
func (r *Recorder) Sealed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sealed
}

// Snapshot is a copy of what a recorder holds.
type Snapshot struct {
	Start    time.Time
	Accesses []api.TraceAccess // in order of first access
	Dropped  int               // first accesses beyond the bound
	Version  uint64            // changes whenever Accesses grows
}

// Snapshot returns a copy of the accesses recorded so far.
func (r *Recorder) Snapshot() Snapshot {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.snapshotLocked()
}

func (r *Recorder) snapshotLocked() Snapshot {
	return Snapshot{
		Start:    r.start,
		Accesses: append([]api.TraceAccess(nil), r.accesses...),
		Dropped:  r.dropped,
		Version:  r.version,
	}
}

// Hooks returns the functions to give package fs for a private view of l:
// onOpen and onRead, bound to this recorder. The view reports the layer
// digest itself; accesses of another layer are ignored.
func (r *Recorder) Hooks(l *Layer) (onOpen func(digest.Digest, string), onRead func(digest.Digest, string, int64, int64)) {
	onOpen = func(d digest.Digest, name string) {
		if string(d) == l.digest {
			r.Open(l, name)
		}
	}
	onRead = func(d digest.Digest, name string, off, size int64) {
		if string(d) == l.digest {
			r.Read(l, name, off, size)
		}
	}
	return onOpen, onRead
}
