package daemon

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"time"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/version"
	"github.com/starlight-project/starlight/worker/pull"
)

// maxRequestSize bounds the JSON body of a worker API request.
const maxRequestSize = 1 << 20

// progressInterval bounds how often a pull stream reports progress.
const progressInterval = 250 * time.Millisecond

// APIHandler serves the worker API (the routes and their JSON are in
// package api, api/worker.go; package client is its Go client).
func (d *Daemon) APIHandler() http.Handler {
	pl := d.Puller
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/pull", func(w http.ResponseWriter, r *http.Request) { servePull(pl, w, r) })
	mux.HandleFunc("GET /v1/images", func(w http.ResponseWriter, r *http.Request) {
		api.WriteJSON(w, http.StatusOK, pl.Images())
	})
	mux.HandleFunc("GET /v1/images/{ref...}", func(w http.ResponseWriter, r *http.Request) {
		ref := r.PathValue("ref")
		img, ok := pl.Image(ref, r.URL.Query().Get("namespace"))
		if !ok {
			api.WriteError(w, http.StatusNotFound, api.CodeNotFound, "image "+ref+" was not pulled through this worker")
			return
		}
		api.WriteJSON(w, http.StatusOK, img)
	})
	mux.HandleFunc("DELETE /v1/images/{ref...}", func(w http.ResponseWriter, r *http.Request) {
		ref := r.PathValue("ref")
		if err := pl.Remove(r.Context(), ref, r.URL.Query().Get("namespace")); err != nil {
			if errors.Is(err, pull.ErrImageNotFound) {
				api.WriteError(w, http.StatusNotFound, api.CodeNotFound, err.Error())
				return
			}
			api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, err.Error())
			return
		}
		res, err := d.Collector.Collect(r.Context())
		if err != nil {
			api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, "image removed; garbage collection: "+err.Error())
			return
		}
		api.WriteJSON(w, http.StatusOK, api.RemoveResult{Ref: ref, Layers: res.Layers, Contents: res.Contents, Bytes: res.Bytes})
	})
	mux.HandleFunc("GET /v1/optimize", func(w http.ResponseWriter, r *http.Request) {
		api.WriteJSON(w, http.StatusOK, api.OptimizeState{On: d.Tracer.Optimize()})
	})
	mux.HandleFunc("PUT /v1/optimize", func(w http.ResponseWriter, r *http.Request) {
		var st api.OptimizeState
		if !decodeRequest(w, r, &st) {
			return
		}
		if err := d.Tracer.SetOptimize(st.On); err != nil {
			api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, err.Error())
			return
		}
		api.WriteJSON(w, http.StatusOK, st)
	})
	mux.HandleFunc("GET /v1/traces", func(w http.ResponseWriter, r *http.Request) {
		traces, err := d.Tracer.List(r.Context())
		if err != nil {
			api.WriteError(w, http.StatusInternalServerError, api.CodeInternal, err.Error())
			return
		}
		api.WriteJSON(w, http.StatusOK, traces)
	})
	mux.HandleFunc("POST /v1/traces/report", func(w http.ResponseWriter, r *http.Request) {
		var req api.ReportRequest
		if !decodeRequest(w, r, &req) {
			return
		}
		res, err := d.Tracer.Report(r.Context(), req.Server)
		if err != nil {
			api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, err.Error())
			return
		}
		api.WriteJSON(w, http.StatusOK, res)
	})
	mux.HandleFunc("GET /v1/info", func(w http.ResponseWriter, r *http.Request) {
		v := version.Get()
		api.WriteJSON(w, http.StatusOK, api.WorkerInfo{
			Version: v.Version, Commit: v.Commit,
			Containerd: d.cfg.Containerd, Root: d.cfg.Root, Address: d.cfg.Address,
			Platform: pull.DefaultPlatform.String(),
		})
	})
	return mux
}

// decodeRequest decodes a small JSON request body, answering 400 on error.
func decodeRequest(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxRequestSize))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "invalid request: "+err.Error())
		return false
	}
	return true
}

func servePull(pl *pull.Puller, w http.ResponseWriter, r *http.Request) {
	var req api.PullRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, maxRequestSize))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, "invalid pull request: "+err.Error())
		return
	}
	p, err := pl.Start(req)
	if err != nil {
		api.WriteError(w, http.StatusBadRequest, api.CodeBadRequest, err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	enc := json.NewEncoder(w)
	emit := func(ev api.PullEvent) bool {
		if err := enc.Encode(ev); err != nil {
			return false
		}
		if flusher != nil {
			flusher.Flush()
		}
		return true
	}

	var (
		lastState    string
		lastProgress api.PullProgress
		lastEmit     time.Time
	)
	for {
		img, changed := p.Snapshot()
		ev := api.PullEvent{Status: img.State, Ref: img.Ref, PullProgress: img.PullProgress, Message: img.Error}
		switch {
		case img.State != lastState:
			lastState = img.State
		case img.PullProgress != lastProgress && time.Since(lastEmit) >= progressInterval:
			ev.Status = api.PullEventProgress
			ev.Message = ""
		default:
			ev.Status = ""
		}
		if ev.Status != "" {
			if !emit(ev) {
				return
			}
			lastProgress, lastEmit = img.PullProgress, time.Now()
		}
		switch {
		case img.State == api.PullFailed, img.State == api.PullComplete:
			return
		case img.State == api.PullReady && !req.Wait:
			return
		}
		select {
		case <-changed:
		case <-r.Context().Done():
			return
		}
		// Progress changes with every frame: let them accumulate.
		if wait := progressInterval - time.Since(lastEmit); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-r.Context().Done():
				t.Stop()
				return
			}
		}
	}
}
