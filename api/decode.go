package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
)

// The decoders of the JSON bodies the registry receives from workers. They
// are strict, so that a client learns at once that the registry does not
// understand a newer request: one JSON object, no unknown field, nothing
// after it. The caller bounds the reader (MaxDeltaRequestSize,
// MaxTraceReportSize); an error of the reader, such as
// *http.MaxBytesError, is wrapped in the error returned.

// decodeStrict decodes exactly one JSON object of r into v.
func decodeStrict(r io.Reader, v any) error {
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		if err != nil && !errors.As(err, new(*json.SyntaxError)) {
			return err // the reader's own error
		}
		return errors.New("trailing data after the JSON object")
	}
	return nil
}

// DecodeDeltaRequest reads and validates (DeltaRequest.Validate) the body
// of POST /starlight/delta.
func DecodeDeltaRequest(r io.Reader) (*DeltaRequest, error) {
	var req DeltaRequest
	if err := decodeStrict(r, &req); err != nil {
		return nil, fmt.Errorf("invalid request body: %w", err)
	}
	if err := req.Validate(); err != nil {
		return nil, err
	}
	return &req, nil
}

// Validate checks what a delta request says on its own: a reference
// (whose grammar, distribution's, the registry checks), a platform with
// both os and architecture or neither, at most MaxHave sha256 digests in
// Have, Resume and HeaderVersion not negative.
func (req *DeltaRequest) Validate() error {
	if req.Reference == "" {
		return errors.New("no reference")
	}
	p := req.Platform
	if (p.OS == "") != (p.Architecture == "") || (p.Variant != "" && p.OS == "") {
		return errors.New("platform needs both os and architecture")
	}
	if len(req.Have) > MaxHave {
		return fmt.Errorf("more than %d layers in have", MaxHave)
	}
	for _, h := range req.Have {
		if _, err := ParseDigest(h); err != nil {
			return fmt.Errorf("have: %w", err)
		}
	}
	if req.Resume < 0 {
		return errors.New("resume must not be negative")
	}
	if req.HeaderVersion < 0 {
		return errors.New("headerVersion must not be negative")
	}
	return nil
}

// DecodeTraceReport reads the body of POST /starlight/v1/traces and
// canonicalises it (TraceReport.Canonicalize).
func DecodeTraceReport(r io.Reader) (*TraceReport, error) {
	var rep TraceReport
	if err := decodeStrict(r, &rep); err != nil {
		return nil, fmt.Errorf("invalid trace report: %w", err)
	}
	if err := rep.Canonicalize(); err != nil {
		return nil, fmt.Errorf("invalid trace report: %w", err)
	}
	return &rep, nil
}

// Canonicalize validates the parts of a trace report that need no index
// and normalises it, so that equal runs hash equal: UTC start time,
// accesses in order of time (stable), each (layer, name, chunk) once.
// Canonicalising a canonical report changes nothing.
func (rep *TraceReport) Canonicalize() error {
	d, err := ParseDigest(rep.ManifestDigest)
	if err != nil {
		return fmt.Errorf("manifestDigest: %w", err)
	}
	rep.ManifestDigest = d.String()
	if len(rep.Worker) > MaxTraceLabel || len(rep.Container) > MaxTraceLabel {
		return fmt.Errorf("worker and container are limited to %d bytes", MaxTraceLabel)
	}
	if n := len(rep.Accesses); n == 0 {
		return errors.New("no accesses")
	} else if n > MaxTraceAccesses {
		return fmt.Errorf("%d accesses, at most %d are accepted", n, MaxTraceAccesses)
	}
	rep.StartedAt = rep.StartedAt.UTC()
	if y := rep.StartedAt.Year(); y < 0 || y > 9999 {
		// JSON (RFC 3339) cannot write it: the report would not hash.
		return fmt.Errorf("startedAt %s is outside the years 0 to 9999 in UTC", rep.StartedAt)
	}
	for i := range rep.Accesses {
		if err := rep.Accesses[i].Validate(i); err != nil {
			return err
		}
	}
	slices.SortStableFunc(rep.Accesses, func(a, b TraceAccess) int {
		switch {
		case a.TimeNS < b.TimeNS:
			return -1
		case a.TimeNS > b.TimeNS:
			return 1
		}
		return 0
	})
	type key struct {
		layer, name string
		chunk       int64
	}
	seen := make(map[key]struct{}, len(rep.Accesses))
	out := rep.Accesses[:0]
	for _, a := range rep.Accesses {
		k := key{a.Layer, a.Name, a.ChunkOffset}
		if _, dup := seen[k]; dup {
			continue
		}
		seen[k] = struct{}{}
		out = append(out, a)
	}
	rep.Accesses = out
	return nil
}

// Validate checks access i of a report on its own and canonicalises its
// digests: a layer digest, a valid name, an optional content digest,
// chunkOffset and timeNs not negative and timeNs at most MaxTraceTime.
func (a *TraceAccess) Validate(i int) error {
	l, err := ParseDigest(a.Layer)
	if err != nil {
		return fmt.Errorf("access %d: layer: %w", i, err)
	}
	a.Layer = l.String()
	if err := ValidateName(a.Name); err != nil {
		return fmt.Errorf("access %d: %w", i, err)
	}
	if a.Digest != "" {
		c, err := ParseDigest(a.Digest)
		if err != nil {
			return fmt.Errorf("access %d (%s): digest: %w", i, a.Name, err)
		}
		a.Digest = c.String()
	}
	if a.ChunkOffset < 0 || a.TimeNS < 0 || a.TimeNS > MaxTraceTime {
		return fmt.Errorf("access %d (%s): chunkOffset and timeNs must be non-negative (and timeNs at most %d)", i, a.Name, MaxTraceTime)
	}
	return nil
}
