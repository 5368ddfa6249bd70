package trace

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/starlight-project/starlight/api"
)

// Trace is one container run's trace as kept on disk until it is
// reported: the report for the registry and where to send it.
type Trace struct {
	// ID names the trace on this worker (the file name).
	ID string `json:"id"`
	// Ref is the image reference the container was created from, as
	// pulled ("host/repo:tag"); Registry is its host, the registry the
	// trace goes to, and PlainHTTP tells that the image was pulled over
	// plain HTTP.
	Ref       string `json:"ref"`
	Registry  string `json:"registry"`
	PlainHTTP bool   `json:"plainHTTP,omitempty"`
	// Partial is true when the container was still running when the trace
	// was written: a periodic checkpoint, or a trace sealed by a report.
	// A partial trace is still a valid startup trace; it is reported as
	// is.
	Partial bool `json:"partial,omitempty"`
	// Dropped counts first accesses beyond the recorder's bound.
	Dropped int             `json:"dropped,omitempty"`
	Report  api.TraceReport `json:"report"`
}

// validID is what NewID produces; anything else is not a trace of ours.
var validID = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,127}$`)

// ValidID reports whether id can name a trace.
func ValidID(id string) bool { return validID.MatchString(id) }

// Dir is the directory of pending traces, one JSON file per trace,
// written atomically.
type Dir struct {
	root string
}

// OpenDir opens (creating) the pending traces directory.
func OpenDir(root string) (*Dir, error) {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("opening trace directory: %w", err)
	}
	return &Dir{root: root}, nil
}

func (d *Dir) path(id string) (string, error) {
	if !ValidID(id) {
		return "", fmt.Errorf("invalid trace id %q", id)
	}
	return filepath.Join(d.root, id+".json"), nil
}

// Save writes t, replacing an earlier version of the same trace.
func (d *Dir) Save(t *Trace) error {
	p, err := d.path(t.ID)
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(d.root, ".tmp-"+t.ID+"-*")
	if err != nil {
		return fmt.Errorf("saving trace %s: %w", t.ID, err)
	}
	defer os.Remove(f.Name())
	if err := json.NewEncoder(f).Encode(t); err != nil {
		f.Close()
		return fmt.Errorf("saving trace %s: %w", t.ID, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("saving trace %s: %w", t.ID, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("saving trace %s: %w", t.ID, err)
	}
	if err := os.Rename(f.Name(), p); err != nil {
		return fmt.Errorf("saving trace %s: %w", t.ID, err)
	}
	return nil
}

// Get reads the trace id.
func (d *Dir) Get(id string) (*Trace, error) {
	p, err := d.path(id)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("reading trace %s: %w", id, err)
	}
	defer f.Close()
	return decode(f, id)
}

func decode(r io.Reader, id string) (*Trace, error) {
	var t Trace
	if err := json.NewDecoder(r).Decode(&t); err != nil {
		return nil, fmt.Errorf("reading trace %s: %w", id, err)
	}
	if t.ID != id {
		return nil, fmt.Errorf("reading trace %s: the file holds trace %q", id, t.ID)
	}
	return &t, nil
}

// List returns every pending trace, oldest run first. Files that do not
// parse are skipped and reported in the error, which does not stop the
// listing.
func (d *Dir) List() ([]*Trace, error) {
	des, err := os.ReadDir(d.root)
	if err != nil {
		return nil, fmt.Errorf("listing traces: %w", err)
	}
	var (
		out  []*Trace
		errs []error
	)
	for _, de := range des {
		id, ok := strings.CutSuffix(de.Name(), ".json")
		if !ok || !ValidID(id) || !de.Type().IsRegular() {
			continue
		}
		t, err := d.Get(id)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, t)
	}
	sort.SliceStable(out, func(i, j int) bool {
		if !out[i].Report.StartedAt.Equal(out[j].Report.StartedAt) {
			return out[i].Report.StartedAt.Before(out[j].Report.StartedAt)
		}
		return out[i].ID < out[j].ID
	})
	return out, errors.Join(errs...)
}

// Remove deletes the trace id; a trace already gone is not an error.
func (d *Dir) Remove(id string) error {
	p, err := d.path(id)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing trace %s: %w", id, err)
	}
	return nil
}

// NewID returns a fresh trace id for a run started at start: sortable by
// time, unique by a random suffix.
func NewID(start time.Time) string {
	var b [6]byte
	rand.Read(b[:])
	return fmt.Sprintf("%d-%s", start.UnixNano(), hex.EncodeToString(b[:]))
}
