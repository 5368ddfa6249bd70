package registryext

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/schema"
)

// Bounds on POST /starlight/v1/traces, besides the body size and access
// count of the API (api.MaxTraceReportSize, api.MaxTraceAccesses).
const (
	// maxOffenders is how many invalid accesses a 400 answer lists.
	maxOffenders = 5
	// traceIngestions bounds concurrent ingestions, decoding included:
	// each holds a decoded report (up to MaxTraceAccesses accesses) and a
	// merge in memory.
	traceIngestions = 2
	// maxTraceValue bounds any one JSON value of a report other than the
	// accesses array (an access, a name, a digest): the decoder never
	// buffers more than this ahead of what it has decoded.
	maxTraceValue = 64 << 10
)

var (
	// traceSlots are the ingestion slots, shared by reports (the route's
	// admission) and the predictions stored at conversion.
	traceSlots = make(chan struct{}, traceIngestions)

	traceReports = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "starlight", Subsystem: "registry", Name: "trace_reports_total",
		Help: "Trace reports received, by result: accepted (stored), existing (duplicate upload), rejected.",
	}, []string{"result"})
)

func init() {
	prometheus.MustRegister(traceReports)
}

// traces serves POST /starlight/v1/traces: it validates a worker's trace
// report against the index, stores it and recomputes the merged priority
// of its manifest. It needs push access to the report's repository.
func (h *handler) traces(w http.ResponseWriter, r *http.Request, x *Extension) (err error) {
	defer func() {
		if err != nil {
			traceReports.WithLabelValues("rejected").Inc()
		}
	}()
	ctx := r.Context()
	// Authenticate before reading a large body, and decode it only
	// inside an ingestion slot, so that concurrent reports cost
	// traceIngestions decoded reports at most. The scope needs the
	// repository named in the body and is checked once it is decoded.
	if err := h.authorize(r); err != nil {
		return err
	}
	release, err := h.ingests.acquire(ctx)
	if err != nil {
		return err
	}
	defer release()
	rep, err := decodeTraceReport(w, r)
	if err != nil {
		return err
	}
	named, err := parseRepository(rep.Repository)
	if err != nil {
		return err
	}
	if err := h.authorize(r, repositoryAccess(named.Name(), "push")); err != nil {
		return err
	}
	res, err := x.ingestTrace(ctx, rep, false)
	if err != nil {
		return err
	}
	status := http.StatusCreated
	if res.Existing {
		status = http.StatusOK
		traceReports.WithLabelValues("existing").Inc()
	} else {
		traceReports.WithLabelValues("accepted").Inc()
	}
	log.G(ctx).WithFields(log.Fields{"repository": rep.Repository, "manifest": rep.ManifestDigest,
		"trace": res.ID, "accesses": res.Accepted, "existing": res.Existing, "worker": rep.Worker}).
		Info("starlight: trace report")
	api.WriteJSON(w, status, res)
	return nil
}

// decodeTraceReport reads, checks and canonicalises the body. It decodes
// as it reads, with the limits applied while decoding: the body size
// (api.MaxTraceReportSize), the number of accesses (api.MaxTraceAccesses:
// the first one too many fails the request before the next is read), the
// size of any one value (maxTraceValue), and each access is validated as
// it arrives. Memory is the decoded accesses, never the body.
func decodeTraceReport(w http.ResponseWriter, r *http.Request) (*api.TraceReport, error) {
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		return nil, errorf(http.StatusUnsupportedMediaType, api.CodeUnsupportedMediaType, "Content-Type must be application/json")
	}
	body := &windowReader{r: http.MaxBytesReader(w, r.Body, api.MaxTraceReportSize), window: maxTraceValue}
	dec := json.NewDecoder(body)
	body.dec = dec
	dec.DisallowUnknownFields()
	rep, err := decodeReportStream(dec)
	if err == nil {
		if _, terr := dec.Token(); terr != io.EOF {
			err = errors.New("trailing data after the JSON object")
		}
	}
	if err != nil {
		var tooBig *http.MaxBytesError
		switch {
		case errors.As(err, &tooBig):
			return nil, errorf(http.StatusRequestEntityTooLarge, api.CodeBadRequest, "trace report larger than %d bytes", api.MaxTraceReportSize)
		case errors.Is(err, errValueTooLarge):
			return nil, errorf(http.StatusRequestEntityTooLarge, api.CodeBadRequest, "invalid trace report: a value larger than %d bytes", maxTraceValue)
		}
		return nil, errorf(http.StatusBadRequest, api.CodeBadRequest, "invalid trace report: %v", err)
	}
	if err := rep.Canonicalize(); err != nil {
		return nil, errorf(http.StatusBadRequest, api.CodeBadRequest, "invalid trace report: %v", err)
	}
	return rep, nil
}

// decodeReportStream decodes one api.TraceReport object field by field,
// the accesses one at a time, validating each (api.TraceAccess.Validate) and
// sharing the strings of equal layer digests.
func decodeReportStream(dec *json.Decoder) (*api.TraceReport, error) {
	var rep api.TraceReport
	if err := expectDelim(dec, '{'); err != nil {
		return nil, err
	}
	layers := map[string]string{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := tok.(string)
		var dst any
		switch key {
		case "repository":
			dst = &rep.Repository
		case "manifestDigest":
			dst = &rep.ManifestDigest
		case "worker":
			dst = &rep.Worker
		case "container":
			dst = &rep.Container
		case "startedAt":
			dst = &rep.StartedAt
		case "accesses":
			if rep.Accesses, err = decodeAccesses(dec, layers); err != nil {
				return nil, err
			}
			continue
		default:
			return nil, fmt.Errorf("json: unknown field %q", key)
		}
		if err := dec.Decode(dst); err != nil {
			return nil, fmt.Errorf("%s: %w", key, err)
		}
	}
	if err := expectDelim(dec, '}'); err != nil {
		return nil, err
	}
	return &rep, nil
}

func decodeAccesses(dec *json.Decoder, layers map[string]string) ([]api.TraceAccess, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if tok == nil {
		return nil, nil // null
	}
	if d, ok := tok.(json.Delim); !ok || d != '[' {
		return nil, fmt.Errorf("accesses: want an array, got %v", tok)
	}
	var out []api.TraceAccess
	for dec.More() {
		if len(out) == api.MaxTraceAccesses {
			return nil, fmt.Errorf("more than %d accesses, at most %d are accepted", api.MaxTraceAccesses, api.MaxTraceAccesses)
		}
		var a api.TraceAccess
		if err := dec.Decode(&a); err != nil {
			return nil, fmt.Errorf("access %d: %w", len(out), err)
		}
		if err := a.Validate(len(out)); err != nil {
			return nil, err
		}
		if l, ok := layers[a.Layer]; ok {
			a.Layer = l
		} else if len(layers) < maxTraceLayers {
			layers[a.Layer] = a.Layer
		}
		out = append(out, a)
	}
	return out, expectDelim(dec, ']')
}

// maxTraceLayers bounds the layer strings decodeAccesses shares; a real
// report names the few layers of one image.
const maxTraceLayers = 1024

func expectDelim(dec *json.Decoder, want json.Delim) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != want {
		return fmt.Errorf("want %q, got %v", want, tok)
	}
	return nil
}

var errValueTooLarge = errors.New("JSON value too large")

// windowReader lets a json.Decoder read at most window bytes past what it
// has decoded (Decoder.InputOffset), so that no single value, however
// long, is buffered whole: the decoder fails with errValueTooLarge
// instead.
type windowReader struct {
	r      io.Reader
	dec    *json.Decoder
	window int64
	read   int64
}

func (w *windowReader) Read(p []byte) (int, error) {
	allowed := w.dec.InputOffset() + w.window - w.read
	if allowed <= 0 {
		return 0, errValueTooLarge
	}
	if int64(len(p)) > allowed {
		p = p[:allowed]
	}
	n, err := w.r.Read(p)
	w.read += int64(n)
	return n, err
}

// traceID is the identity of a canonical report: the sha256 of its JSON;
// of a predicted one, the sha256 of "predicted\n" and its JSON, so that
// no report a worker uploads is taken for a prediction or the reverse.
func traceID(rep *api.TraceReport, predicted bool) (string, error) {
	b, err := json.Marshal(rep)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	if predicted {
		h.Write([]byte("predicted\n"))
	}
	h.Write(b)
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

// ingestTrace validates a canonical report against the index and stores
// it with the recomputed priority of its manifest. A predicted report
// (package predict, at conversion) is stored marked so: it orders the
// manifest's bundles only while the manifest has no real trace.
func (x *Extension) ingestTrace(ctx context.Context, rep *api.TraceReport, predicted bool) (*api.TraceResult, error) {
	id, err := traceID(rep, predicted)
	if err != nil {
		return nil, fmt.Errorf("hashing trace report: %w", err)
	}
	if _, _, err := x.db.TraceTarget(ctx, rep.Repository, rep.ManifestDigest); errors.Is(err, schema.ErrNotFound) {
		return nil, errorf(http.StatusNotFound, api.CodeNotFound, "%s@%s is not a converted platform manifest of a ready image",
			rep.Repository, rep.ManifestDigest)
	} else if err != nil {
		return nil, err
	}
	if ok, err := x.db.TraceExists(ctx, id); err != nil {
		return nil, err
	} else if ok {
		return &api.TraceResult{ID: id, Accepted: 0, Existing: true}, nil
	}
	layers, err := x.db.ManifestLayers(ctx, rep.ManifestDigest)
	if err != nil {
		return nil, err
	}
	entries, err := x.resolveAccesses(ctx, layers, rep.Accesses)
	if err != nil {
		return nil, err
	}
	t := &schema.Trace{ID: id, Repository: rep.Repository, ManifestDigest: rep.ManifestDigest,
		Worker: rep.Worker, Container: rep.Container, StartedAt: rep.StartedAt, Predicted: predicted, Entries: entries}
	existing, err := x.db.AddTrace(ctx, t, func(runs []schema.TraceRun) []schema.PriorityItem {
		return mergeTraces(layers, runs)
	})
	if err != nil {
		return nil, err
	}
	res := &api.TraceResult{ID: id, Existing: existing}
	if !existing {
		res.Accepted = len(entries)
	}
	return res, nil
}

// traceFile is what validation needs of an indexed entry.
type traceFile struct {
	digest string  // content, through a hard link
	chunks []int64 // chunk offsets
}

// resolveAccesses checks every access against the index of its layer and
// returns the entries to store, with the content digest from the index.
// Unknown layers or files, wrong digests and offsets that are not chunk
// boundaries are refused with the first few offenders listed.
func (x *Extension) resolveAccesses(ctx context.Context, layers []string, accesses []api.TraceAccess) ([]schema.TraceEntry, error) {
	inManifest := make(map[string]bool, len(layers))
	for _, l := range layers {
		inManifest[l] = true
	}
	trees := map[string]map[string]traceFile{}
	var offenders []string
	bad := 0
	offend := func(i int, a *api.TraceAccess, format string, args ...any) {
		bad++
		if len(offenders) < maxOffenders {
			offenders = append(offenders, fmt.Sprintf("access %d %s %q: ", i, shortDigest(a.Layer), a.Name)+fmt.Sprintf(format, args...))
		}
	}
	out := make([]schema.TraceEntry, 0, len(accesses))
	for i := range accesses {
		a := &accesses[i]
		if !inManifest[a.Layer] {
			offend(i, a, "layer is not in the manifest")
			continue
		}
		files, ok := trees[a.Layer]
		if !ok {
			l, err := x.db.GetLayer(ctx, a.Layer)
			if err != nil {
				return nil, fmt.Errorf("loading index of layer %s: %w", a.Layer, err)
			}
			files = layerTraceFiles(l.Entries)
			trees[a.Layer] = files
		}
		f, ok := files[a.Name]
		switch {
		case !ok:
			offend(i, a, "no such file in the layer")
			continue
		case a.Digest != "" && a.Digest != f.digest:
			offend(i, a, "digest %s does not match the indexed content", shortDigest(a.Digest))
			continue
		case a.ChunkOffset != 0 && !slices.Contains(f.chunks, a.ChunkOffset):
			offend(i, a, "chunkOffset %d is not a chunk boundary of the file", a.ChunkOffset)
			continue
		}
		out = append(out, schema.TraceEntry{Layer: a.Layer, Name: a.Name, Digest: f.digest,
			ChunkOffset: a.ChunkOffset, TimeNS: a.TimeNS})
	}
	if bad > 0 {
		more := ""
		if bad > len(offenders) {
			more = fmt.Sprintf(" (and %d more)", bad-len(offenders))
		}
		return nil, errorf(http.StatusBadRequest, api.CodeBadRequest, "%d of %d accesses do not match the image: %s%s",
			bad, len(accesses), strings.Join(offenders, "; "), more)
	}
	return out, nil
}

// layerTraceFiles indexes a layer's entries by name. A hard link takes
// the content of its target.
func layerTraceFiles(entries []api.Entry) map[string]traceFile {
	files := make(map[string]traceFile, len(entries))
	for i := range entries {
		e := &entries[i]
		f := traceFile{digest: e.Digest}
		if e.Type == api.TypeHardlink {
			f = files[e.LinkName]
		}
		if len(e.Chunks) > 0 {
			f.chunks = make([]int64, len(e.Chunks))
			for j, c := range e.Chunks {
				f.chunks[j] = c.Offset
			}
		}
		files[e.Name] = f
	}
	return files
}

// shortDigest abbreviates a digest for error messages.
func shortDigest(d string) string {
	if len(d) > 19 {
		return d[:19]
	}
	return d
}
