package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
	"time"
)

var (
	hexA = strings.Repeat("a", 64)
	hexB = strings.Repeat("b", 64)
)

func TestDecodeDeltaRequest(t *testing.T) {
	tooMany := make([]string, MaxHave+1)
	for i := range tooMany {
		tooMany[i] = fmt.Sprintf("%q", "sha256:"+hexA)
	}
	for _, tc := range []struct {
		name, body string
		want       string // "" accepts; else a substring of the error
	}{
		{"minimal", `{"reference":"app:v1"}`, ""},
		{"full", `{"reference":"app@sha256:` + hexA + `","platform":{"os":"linux","architecture":"arm64","variant":"v8"},"have":["sha256:` + hexB + `"],"resume":3,"headerVersion":2}`, ""},
		{"whitespace after", "{\"reference\":\"app:v1\"}\n\t ", ""},
		{"empty", ``, "invalid request body: EOF"},
		{"not an object", `[]`, "invalid request body"},
		{"unknown field", `{"reference":"app:v1","haves":[]}`, `unknown field "haves"`},
		{"trailing object", `{"reference":"app:v1"}{}`, "trailing data"},
		{"trailing garbage", `{"reference":"app:v1"} x`, "trailing data"},
		{"no reference", `{}`, "no reference"},
		{"os without architecture", `{"reference":"a:b","platform":{"os":"linux"}}`, "platform needs both"},
		{"variant alone", `{"reference":"a:b","platform":{"variant":"v7"}}`, "platform needs both"},
		{"bad have", `{"reference":"a:b","have":["sha256:abc"]}`, "have: invalid digest"},
		{"sha512 have", `{"reference":"a:b","have":["sha512:` + hexA + hexA + `"]}`, "only sha256"},
		{"too many have", `{"reference":"a:b","have":[` + strings.Join(tooMany, ",") + `]}`, "more than 10000 layers"},
		{"negative resume", `{"reference":"a:b","resume":-1}`, "resume must not be negative"},
		{"negative header version", `{"reference":"a:b","headerVersion":-1}`, "headerVersion must not be negative"},
		{"resume not a number", `{"reference":"a:b","resume":"3"}`, "invalid request body"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := DecodeDeltaRequest(strings.NewReader(tc.body))
			if tc.want == "" {
				if err != nil || req == nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error saying %q", err, tc.want)
			}
		})
	}
}

// The reader's own error (the registry's body limit) stays visible.
func TestDecodeKeepsReaderErrors(t *testing.T) {
	limit := errors.New("http: request body too large")
	for _, tc := range []struct {
		name   string
		decode func(io.Reader) error
		object string
	}{
		{"delta", func(r io.Reader) error { _, err := DecodeDeltaRequest(r); return err }, `{"reference":"app:v1"}`},
		{"traces", func(r io.Reader) error { _, err := DecodeTraceReport(r); return err }, `{"repository":"app"}`},
	} {
		// Failing inside the object, and after it.
		for _, prefix := range []string{tc.object[:len(tc.object)/2], tc.object + "  "} {
			r := io.MultiReader(strings.NewReader(prefix), &errReader{limit})
			if err := tc.decode(r); !errors.Is(err, limit) {
				t.Errorf("%s after %q: %v, want the reader's error", tc.name, prefix, err)
			}
		}
	}
}

type errReader struct{ err error }

func (r *errReader) Read([]byte) (int, error) { return 0, r.err }

func TestDecodeTraceReport(t *testing.T) {
	layer := "sha256:" + hexA
	access := func(name string, ns int64) string {
		return fmt.Sprintf(`{"layer":%q,"name":%q,"digest":"sha256:%s","timeNs":%d}`, layer, name, hexB, ns)
	}
	report := func(accesses ...string) string {
		return `{"repository":"app","manifestDigest":"sha256:` + hexA + `","startedAt":"2024-01-02T05:04:05+02:00","accesses":[` + strings.Join(accesses, ",") + `]}`
	}
	for _, tc := range []struct {
		name, body string
		want       string
	}{
		{"one access", report(access("bin/sh", 5)), ""},
		{"unknown field", strings.Replace(report(access("a", 1)), `"repository"`, `"repo":"x","repository"`, 1), `unknown field "repo"`},
		{"trailing data", report(access("a", 1)) + "{}", "trailing data"},
		{"no accesses", report(), "no accesses"},
		{"bad manifest", strings.Replace(report(access("a", 1)), "sha256:"+hexA, "sha256:x", 1), "manifestDigest"},
		{"escaping name", report(access("../etc/passwd", 1)), "escapes the layer root"},
		{"negative time", report(access("a", -1)), "must be non-negative"},
		{"time too large", report(access("a", MaxTraceTime+1)), "must be non-negative"},
		{"long worker", strings.Replace(report(access("a", 1)), `"repository"`, `"worker":"`+strings.Repeat("w", MaxTraceLabel+1)+`","repository"`, 1), "limited to 256 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep, err := DecodeTraceReport(strings.NewReader(tc.body))
			if tc.want == "" {
				if err != nil || rep == nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error saying %q", err, tc.want)
			}
		})
	}
}

// Canonical form: UTC, ordered by time (stable), one access per (layer,
// name, chunk), and canonicalising again changes nothing.
func TestCanonicalizeTraceReport(t *testing.T) {
	layer := "sha256:" + hexA
	rep := &TraceReport{
		Repository: "app", ManifestDigest: "sha256:" + hexB,
		StartedAt: time.Date(2024, 1, 2, 5, 4, 5, 0, time.FixedZone("x", 7200)),
		Accesses: []TraceAccess{
			{Layer: layer, Name: "b", TimeNS: 20},
			{Layer: layer, Name: "a", TimeNS: 10},
			{Layer: layer, Name: "c", TimeNS: 20},
			{Layer: layer, Name: "a", TimeNS: 30},                      // a again
			{Layer: layer, Name: "a", ChunkOffset: 1 << 20, TimeNS: 5}, // another chunk of a
		},
	}
	if err := rep.Canonicalize(); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, a := range rep.Accesses {
		names = append(names, fmt.Sprintf("%s@%d", a.Name, a.ChunkOffset))
	}
	if got, want := strings.Join(names, " "), "a@1048576 a@0 b@0 c@0"; got != want {
		t.Errorf("accesses %s, want %s", got, want)
	}
	if rep.StartedAt.Location() != time.UTC {
		t.Errorf("startedAt %v not in UTC", rep.StartedAt)
	}
	b1, _ := json.Marshal(rep)
	again := *rep
	again.Accesses = append([]TraceAccess(nil), rep.Accesses...)
	if err := again.Canonicalize(); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(&again, rep) {
		b2, _ := json.Marshal(&again)
		t.Errorf("canonicalising again changed the report:\n%s\n%s", b1, b2)
	}
}
