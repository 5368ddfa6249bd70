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

	"github.com/spf13/pflag"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/version"
)

func TestGlobalFlagsEnv(t *testing.T) {
	for _, tc := range []struct {
		name     string
		env      map[string]string
		args     []string
		wantNS   string
		wantAddr string
	}{
		{"defaults", nil, nil, "default", ""},
		{"env", map[string]string{"CONTAINERD_NAMESPACE": "k8s.io", "CONTAINERD_ADDRESS": "/run/k3s/containerd.sock"}, nil,
			"k8s.io", "/run/k3s/containerd.sock"},
		{"flags win", map[string]string{"CONTAINERD_NAMESPACE": "k8s.io", "CONTAINERD_ADDRESS": "/run/k3s/containerd.sock"},
			[]string{"-n", "sl", "-a", "/run/containerd/containerd.sock"}, "sl", "/run/containerd/containerd.sock"},
		{"long flags win", map[string]string{"CONTAINERD_NAMESPACE": "k8s.io"},
			[]string{"--namespace", "sl", "--address", "/x.sock"}, "sl", "/x.sock"},
		{"empty env is unset", map[string]string{"CONTAINERD_NAMESPACE": "", "CONTAINERD_ADDRESS": ""}, nil, "default", ""},
	} {
		var g globalOptions
		fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
		addGlobalFlags(fs, &g, func(k string) string { return tc.env[k] })
		if err := fs.Parse(tc.args); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if g.namespace != tc.wantNS || g.address != tc.wantAddr || g.worker != "/run/starlight/api.sock" {
			t.Errorf("%s: namespace %q address %q worker %q; want %q, %q", tc.name, g.namespace, g.address, g.worker, tc.wantNS, tc.wantAddr)
		}
	}
}

func TestVersionFlag(t *testing.T) {
	defer func(v, c, rv string) { version.Version, version.Commit, rootCmd.Version = v, c, rv }(version.Version, version.Commit, rootCmd.Version)
	version.Version, version.Commit = "v1.2.3-4-gabcdef", "abcdef0123"
	rootCmd.Version = version.Get().String()
	var out bytes.Buffer
	rootCmd.SetOut(&out)
	rootCmd.SetArgs([]string{"--version"})
	defer rootCmd.SetArgs(nil)
	defer rootCmd.SetOut(nil)
	if err := rootCmd.Execute(); err != nil {
		t.Fatal(err)
	}
	if got, want := out.String(), "ctr-starlight version v1.2.3-4-gabcdef (commit abcdef0123)\n"; got != want {
		t.Errorf("--version printed %q, want %q", got, want)
	}
}

// infoWorker serves GET /v1/info with info.
func infoWorker(t *testing.T, info api.WorkerInfo) string {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/info", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(info)
	})
	return serveWorkerAPI(t, mux)
}

func TestContainerdAddress(t *testing.T) {
	defer func(g globalOptions) { global = g }(global)
	ctx := context.Background()

	// No -a, no CONTAINERD_ADDRESS: the worker's containerd.
	global.worker = infoWorker(t, api.WorkerInfo{Containerd: "/run/worker-test/containerd.sock"})
	global.address = ""
	if got, err := containerdAddress(ctx); err != nil || got != "/run/worker-test/containerd.sock" {
		t.Errorf("without an address: %q, %v; want the worker's containerd", got, err)
	}
	// An address given wins, and the worker is not asked.
	global.address = "/run/given.sock"
	global.worker = filepath.Join(t.TempDir(), "nothing.sock")
	if got, err := containerdAddress(ctx); err != nil || got != "/run/given.sock" {
		t.Errorf("with -a: %q, %v", got, err)
	}
	// Neither an address nor a worker: the error says what to give.
	global.address = ""
	if _, err := containerdAddress(ctx); err == nil || !strings.Contains(err.Error(), "-a or CONTAINERD_ADDRESS") {
		t.Errorf("without address and worker: %v", err)
	}
	global.worker = infoWorker(t, api.WorkerInfo{})
	if _, err := containerdAddress(ctx); err == nil || !strings.Contains(err.Error(), "names no containerd") {
		t.Errorf("worker without containerd: %v", err)
	}
}

func TestPullPlatformFlag(t *testing.T) {
	defer func(g globalOptions) { global = g }(global)
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan api.PullRequest, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req api.PullRequest
		json.NewDecoder(r.Body).Decode(&req)
		got <- req
		json.NewEncoder(w).Encode(api.PullEvent{Status: api.PullReady, Ref: req.Ref})
	})}
	go srv.Serve(l)
	defer srv.Close()
	var out bytes.Buffer
	rootCmd.SetOut(&out)
	rootCmd.SetArgs([]string{"--worker", sock, "-n", "sl", "pull", "--platform", "linux/arm64", "reg.example/app:v1"})
	defer rootCmd.SetArgs(nil)
	defer rootCmd.SetOut(nil)
	if err := rootCmd.Execute(); err != nil {
		t.Fatal(err)
	}
	if req := <-got; req.Platform != "linux/arm64" || req.Namespace != "sl" || req.Ref != "reg.example/app:v1" {
		t.Errorf("pull request %+v", req)
	}
}
