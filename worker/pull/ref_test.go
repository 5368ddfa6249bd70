package pull

import (
	"strings"
	"testing"

	"github.com/starlight-project/starlight/worker/config"
)

func TestParseRef(t *testing.T) {
	const dgst = "sha256:4d6f6b1dd0ea3b0bc7fd4a0b4ad4e7b0b8f3c6d8a3e0c2a6b8d8f1e2c3b4a5d6"
	tests := []struct {
		in                     string
		host, repo, tag, delta string
		wantErr                string
	}{
		{in: "127.0.0.1:5000/app:v1", host: "127.0.0.1:5000", repo: "app", tag: "v1", delta: "app:v1"},
		{in: "127.0.0.1:5000/team/app", host: "127.0.0.1:5000", repo: "team/app", tag: "latest", delta: "team/app:latest"},
		{in: "localhost:5000/app@" + dgst, host: "localhost:5000", repo: "app", delta: "app@" + dgst},
		{in: "reg.example.com/a/b:1.0@" + dgst, host: "reg.example.com", repo: "a/b", tag: "1.0", delta: "a/b@" + dgst},
		{in: "busybox", host: "docker.io", repo: "library/busybox", tag: "latest", delta: "library/busybox:latest"},
		{in: "", wantErr: "empty"},
		{in: "Host:5000/App:v1", wantErr: "invalid image reference"},
		{in: "127.0.0.1:5000/app:bad tag", wantErr: "invalid image reference"},
		{in: "127.0.0.1:5000/app@sha512:" + strings.Repeat("a", 128), wantErr: "invalid image reference"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			r, err := ParseRef(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.Name != tt.in || r.Host != tt.host || r.Repository != tt.repo || r.Tag != tt.tag || r.DeltaReference() != tt.delta {
				t.Fatalf("got %+v (delta %q)", r, r.DeltaReference())
			}
		})
	}
}

func TestResolveEndpoint(t *testing.T) {
	strict := config.Default()
	strict.Registries = []config.Registry{
		{Host: "127.0.0.1:5000", PlainHTTP: true, Username: "u", Password: "p"},
		{Host: "reg.example.com"},
	}
	fallback := config.Default()
	fallback.AllowPlainFallback = true
	fallback.Registries = strict.Registries

	tests := []struct {
		name      string
		cfg       *config.Config
		ref       string
		plainHTTP bool
		wantURL   string
		starlight bool
		wantUser  string
		wantErr   string
	}{
		{name: "configured plain", cfg: strict, ref: "127.0.0.1:5000/app:v1", wantURL: "http://127.0.0.1:5000", starlight: true, wantUser: "u"},
		{name: "configured tls", cfg: strict, ref: "reg.example.com/app", wantURL: "https://reg.example.com", starlight: true},
		{name: "request forces http", cfg: strict, ref: "reg.example.com/app", plainHTTP: true, wantURL: "http://reg.example.com", starlight: true},
		{name: "other port is another host", cfg: strict, ref: "127.0.0.1:5001/app", wantErr: "host 127.0.0.1:5001 is not a configured Starlight registry (configured: 127.0.0.1:5000, reg.example.com)"},
		{name: "docker hub", cfg: strict, ref: "busybox", wantErr: "host docker.io is not a configured"},
		{name: "fallback", cfg: fallback, ref: "docker.io/library/busybox:1", wantURL: "https://docker.io", starlight: false},
		{name: "fallback plain", cfg: fallback, ref: "10.0.0.1:5000/x", plainHTTP: true, wantURL: "http://10.0.0.1:5000", starlight: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := ParseRef(tt.ref)
			if err != nil {
				t.Fatal(err)
			}
			ep, err := ResolveEndpoint(tt.cfg, r, tt.plainHTTP)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if ep.Registry.BaseURL() != tt.wantURL || ep.Starlight != tt.starlight || ep.Registry.Username != tt.wantUser {
				t.Fatalf("got %+v", ep)
			}
		})
	}
}
