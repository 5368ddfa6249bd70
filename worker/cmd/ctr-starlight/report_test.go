package main

import (
	"bytes"
	"testing"
	"time"

	"github.com/starlight-project/starlight/api"
)

func TestPrintReport(t *testing.T) {
	ok := api.TraceUpload{
		TraceSummary: api.TraceSummary{ID: "1-a", Ref: "reg/app:v1", Container: "c1", Accesses: 12, Files: 9},
		URL:          "http://reg/starlight/v1/traces", Accepted: 12,
	}
	failed := api.TraceUpload{
		TraceSummary: api.TraceSummary{ID: "2-b", Ref: "reg/app:v2", Container: "c2"},
		Error:        "registry: BAD_REQUEST: unknown file etc/x",
	}
	tests := []struct {
		name    string
		res     api.ReportResult
		want    string
		wantErr bool
	}{
		{"nothing", api.ReportResult{}, "no trace to report\n", false},
		{"uploaded", api.ReportResult{Traces: []api.TraceUpload{ok}},
			"1-a: reg/app:v1 (c1): 12 accesses of 9 files sent to http://reg/starlight/v1/traces\n", false},
		{"one failed", api.ReportResult{Traces: []api.TraceUpload{ok, failed}},
			"1-a: reg/app:v1 (c1): 12 accesses of 9 files sent to http://reg/starlight/v1/traces\n" +
				"2-b: reg/app:v2 (c2): failed: registry: BAD_REQUEST: unknown file etc/x\n", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			err := printReport(&out, &tt.res)
			if (err != nil) != tt.wantErr || out.String() != tt.want {
				t.Fatalf("got %q, %v; want %q (error %v)", out.String(), err, tt.want, tt.wantErr)
			}
		})
	}
}

func TestPrintTraces(t *testing.T) {
	var out bytes.Buffer
	printTraces(&out, []api.TraceSummary{
		{ID: "1-a", Container: "c1", Ref: "reg/app:v1", Files: 3, Accesses: 4, StartedAt: time.Unix(1, 0)},
		{ID: "2-b", Container: "c2", Ref: "reg/app:v1", Files: 1, Accesses: 1, Recording: true, Partial: true},
	})
	want := "ID   CONTAINER  IMAGE       FILES  ACCESSES  STATE\n" +
		"1-a  c1         reg/app:v1  3      4         complete\n" +
		"2-b  c2         reg/app:v1  1      1         recording\n"
	if out.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", out.String(), want)
	}
}
