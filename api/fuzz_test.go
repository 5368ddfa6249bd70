package api

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"
)

// The fuzz targets run their seeds (f.Add and testdata/fuzz/FuzzX) as
// ordinary tests; `go test -fuzz FuzzX ./api` explores further.

// FuzzDecodeDeltaRequest: any body is refused or decodes to a valid
// request, which re-encoded (as a worker sends it) decodes to itself.
func FuzzDecodeDeltaRequest(f *testing.F) {
	for _, s := range []string{
		`{"reference":"app:v1"}`,
		`{"reference":"library/app@sha256:` + hexA + `","platform":{"os":"linux","architecture":"arm64","variant":"v8"},"have":["sha256:` + hexB + `","sha256:` + hexB + `"],"resume":7,"headerVersion":2}`,
		`{"reference":"a:b","platform":{"os":"linux"}}`,
		`{"reference":"a:b"} {}`,
		`{"reference":"a:b","have":["sha256:` + hexA[:10] + `"]}`,
		`{"reference":"a:b","resume":-1,"haves":1}`,
		"{\"reference\":\"\\u0000\"}",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, err := DecodeDeltaRequest(bytes.NewReader(body))
		if err != nil {
			return
		}
		if err := req.Validate(); err != nil {
			t.Fatalf("decoded an invalid request: %v", err)
		}
		b, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		again, err := DecodeDeltaRequest(bytes.NewReader(b))
		if err != nil {
			t.Fatalf("the request re-encoded is refused: %v\n%s", err, b)
		}
		if len(req.Have) == 0 {
			req.Have = nil // omitempty
		}
		if !reflect.DeepEqual(req, again) {
			t.Fatalf("round trip changed the request:\n%+v\n%+v", req, again)
		}
	})
}

// FuzzDecodeTraceReport: any body is refused or decodes to a canonical
// report: canonicalising it again, or re-encoding and decoding it, gives
// the same report, so its identity (the hash of its JSON) is stable.
func FuzzDecodeTraceReport(f *testing.F) {
	acc := `{"layer":"sha256:` + hexA + `","name":"bin/sh","digest":"sha256:` + hexB + `","timeNs":5}`
	for _, s := range []string{
		`{"repository":"app","manifestDigest":"sha256:` + hexA + `","startedAt":"2024-01-02T05:04:05+02:00","accesses":[` + acc + `]}`,
		`{"repository":"app","manifestDigest":"sha256:` + hexA + `","worker":"w","container":"c","startedAt":"2024-01-02T05:04:05.123456789Z","accesses":[` +
			acc + `,{"layer":"sha256:` + hexB + `","name":"lib/x.so","chunkOffset":1048576,"timeNs":3},` + acc + `]}`,
		`{"repository":"app","manifestDigest":"sha256:` + hexA + `","startedAt":"0000-01-01T00:00:00+01:00","accesses":[` + acc + `]}`,
		`{"repository":"app","manifestDigest":"sha256:` + hexA + `","startedAt":"2024-01-02T05:04:05Z","accesses":[]}`,
		`{"repository":"app","manifestDigest":"sha256:` + hexA + `","accesses":[{"layer":"sha256:` + hexA + `","name":"../x","timeNs":1}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		rep, err := DecodeTraceReport(bytes.NewReader(body))
		if err != nil {
			return
		}
		b, err := json.Marshal(rep)
		if err != nil {
			t.Fatalf("a canonical report does not encode: %v", err)
		}
		again := *rep
		again.Accesses = append([]TraceAccess(nil), rep.Accesses...)
		if err := again.Canonicalize(); err != nil {
			t.Fatalf("canonicalising again: %v", err)
		}
		if !reflect.DeepEqual(&again, rep) {
			t.Fatalf("canonicalising again changed the report:\n%+v\n%+v", rep, &again)
		}
		decoded, err := DecodeTraceReport(bytes.NewReader(b))
		if err != nil {
			t.Fatalf("the canonical report re-encoded is refused: %v\n%s", err, b)
		}
		if b2, _ := json.Marshal(decoded); !bytes.Equal(b, b2) {
			t.Fatalf("round trip changed the report:\n%s\n%s", b, b2)
		}
	})
}
