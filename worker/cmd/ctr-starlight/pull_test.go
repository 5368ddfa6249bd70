package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/starlight-project/starlight/api"
)

// fakeWorker serves the worker API on a unix socket with canned events.
func fakeWorker(t *testing.T, events []api.PullEvent, images []api.WorkerImage) string {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/pull", func(w http.ResponseWriter, r *http.Request) {
		var req api.PullRequest
		json.NewDecoder(r.Body).Decode(&req)
		if req.Ref == "bad" {
			w.WriteHeader(http.StatusBadRequest)
			json.NewEncoder(w).Encode(api.Error{Message: "invalid image reference \"bad\""})
			return
		}
		for _, ev := range events {
			json.NewEncoder(w).Encode(ev)
		}
	})
	mux.HandleFunc("GET /v1/images", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(images)
	})
	return serveWorkerAPI(t, mux)
}

// serveWorkerAPI serves h on a unix socket, as the worker serves its API,
// until the test ends, and returns the socket's path.
func serveWorkerAPI(t *testing.T, h http.Handler) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func TestRunPull(t *testing.T) {
	progress := api.PullProgress{BytesReceived: 1500, BytesTotal: 3000, FramesReceived: 1, FramesTotal: 2, FilesReceived: 1, FilesTotal: 2}
	done := api.PullProgress{BytesReceived: 3000, BytesTotal: 3000, FramesReceived: 2, FramesTotal: 2, FilesReceived: 2, FilesTotal: 2}
	tests := []struct {
		name    string
		events  []api.PullEvent
		ref     string
		wait    bool
		tty     bool
		want    string
		wantErr string
	}{
		{
			name:   "ready, quiet",
			events: []api.PullEvent{{Status: "resolving", Ref: "r"}, {Status: "ready", Ref: "r", PullProgress: api.PullProgress{BytesTotal: 3000, FilesTotal: 2}}},
			want:   "r: ready (0 B of 3.0 kB received, 0 of 2 files; the rest streams in the background)\n",
		},
		{
			name: "wait, quiet",
			wait: true,
			events: []api.PullEvent{{Status: "ready", Ref: "r"}, {Status: "progress", Ref: "r", PullProgress: progress},
				{Status: "complete", Ref: "r", PullProgress: done}},
			want: "r: complete (3.0 kB in 2 files received)\n",
		},
		{
			name:   "terminal shows a bar",
			wait:   true,
			tty:    true,
			events: []api.PullEvent{{Status: "resolving", Ref: "r"}, {Status: "ready", Ref: "r"}, {Status: "progress", Ref: "r", PullProgress: progress}, {Status: "complete", Ref: "r", PullProgress: done}},
			want:   "2/2 files",
		},
		{
			name:    "failure is verbatim",
			events:  []api.PullEvent{{Status: "resolving", Ref: "r"}, {Status: "failed", Ref: "r", Message: "r: registry: NOT_FOUND: image r not found"}},
			wantErr: "r: registry: NOT_FOUND: image r not found",
		},
		{
			name:    "rejected request",
			ref:     "bad",
			wantErr: `invalid image reference "bad"`,
		},
		{
			name:    "stream ends early",
			events:  []api.PullEvent{{Status: "resolving", Ref: "r"}},
			wantErr: "ended the pull stream",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			global.worker = fakeWorker(t, tt.events, nil)
			ref := tt.ref
			if ref == "" {
				ref = "r"
			}
			var out bytes.Buffer
			err := runPull(context.Background(), &out, tt.tty, api.PullRequest{Ref: ref, Wait: tt.wait})
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr && !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tt.tty && !strings.Contains(out.String(), tt.want) || !tt.tty && out.String() != tt.want {
				t.Fatalf("output %q, want %q", out.String(), tt.want)
			}
		})
	}
}

func TestPrintImages(t *testing.T) {
	var out bytes.Buffer
	printImages(&out, []api.WorkerImage{
		{Ref: "127.0.0.1:5000/app:v1", Digest: "sha256:0123456789abcdef0123", Platform: "linux/arm64", State: "complete", Complete: true,
			ImageBytes: 2_000_000, DedupBytes: 1_000_000, SendBytes: 1_000_000,
			PullProgress: api.PullProgress{BytesReceived: 1_000_000, BytesTotal: 1_000_000}},
		{Ref: "127.0.0.1:5000/app:v2", State: "failed", Error: "registry: NOT_FOUND: no"},
	})
	want := "REF                    DIGEST               PLATFORM     SIZE    DEDUP   SENT    RECEIVED       STATE\n" +
		"127.0.0.1:5000/app:v1  sha256:0123456789ab  linux/arm64  2.0 MB  1.0 MB  1.0 MB  1.0 MB (100%)  complete\n" +
		"127.0.0.1:5000/app:v2                       -            0 B     -       -       -              failed: registry: NOT_FOUND: no\n"
	if out.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", out.String(), want)
	}
}
