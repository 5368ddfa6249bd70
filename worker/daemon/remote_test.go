package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/config"
)

func TestRemoteBearerToken(t *testing.T) {
	var tokenRequests int
	mux := http.NewServeMux()
	var srv *httptest.Server
	mux.HandleFunc("/token", func(w http.ResponseWriter, r *http.Request) {
		tokenRequests++
		u, p, ok := r.BasicAuth()
		if !ok || u != "bob" || p != "pw" || r.URL.Query().Get("scope") != "repository:team/app:pull" || r.URL.Query().Get("service") != "reg" {
			http.Error(w, "denied", http.StatusUnauthorized)
			return
		}
		json.NewEncoder(w).Encode(map[string]string{"token": "T0K"})
	})
	mux.HandleFunc("/starlight/delta", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer T0K" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="`+srv.URL+`/token",service="reg",scope="repository:team/app:pull"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		io.WriteString(w, "bundle bytes")
	})
	srv = httptest.NewServer(mux)
	defer srv.Close()
	reg := config.Registry{Host: strings.TrimPrefix(srv.URL, "http://"), PlainHTTP: true, Username: "bob", Password: "pw"}

	r := NewRemote()
	for i := 0; i < 2; i++ {
		body, err := r.Delta(context.Background(), reg, "team/app", api.DeltaRequest{Reference: "team/app:v1"})
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(body)
		body.Close()
		if string(b) != "bundle bytes" {
			t.Fatalf("body %q", b)
		}
	}
	if tokenRequests != 1 {
		t.Fatalf("%d token requests, want 1 (the token is reused)", tokenRequests)
	}
}

func TestRemoteErrors(t *testing.T) {
	tests := []struct {
		name    string
		status  int
		header  string
		body    string
		reg     config.Registry
		wantErr string
	}{
		{"starlight error", 404, "", `{"code":"NOT_FOUND","message":"image app:v9 not found"}`, config.Registry{}, "registry: NOT_FOUND: image app:v9 not found"},
		{"distribution error", 403, "", `{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}`, config.Registry{}, "registry: DENIED: requested access"},
		{"not starlight", 404, "", "404 page not found", config.Registry{}, "is this a Starlight registry?"},
		{"no credentials", 401, `Basic realm="x"`, "", config.Registry{}, "requires authentication: configure username and password"},
		{"wrong credentials", 401, `Basic realm="x"`, `{"code":"UNAUTHORIZED","message":"authentication required"}`, config.Registry{Username: "u", Password: "bad"}, "registry: UNAUTHORIZED: authentication required"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if tt.header != "" {
					w.Header().Set("WWW-Authenticate", tt.header)
				}
				w.WriteHeader(tt.status)
				io.WriteString(w, tt.body)
			}))
			defer srv.Close()
			reg := tt.reg
			reg.Host, reg.PlainHTTP = strings.TrimPrefix(srv.URL, "http://"), true
			_, err := NewRemote().Delta(context.Background(), reg, "app", api.DeltaRequest{Reference: "app:v9"})
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
			}
			var re *RegistryError
			if tt.status != 401 || tt.reg.Username != "" {
				if !errors.As(err, &re) || re.Status != tt.status {
					t.Fatalf("error %v is not a RegistryError with status %d", err, tt.status)
				}
			}
		})
	}
}

func TestParseChallenge(t *testing.T) {
	scheme, p := parseChallenge(`Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push"`)
	if scheme != "Bearer" || p["realm"] != "https://auth.example.com/token" || p["service"] != "registry.example.com" || p["scope"] != "repository:a/b:pull,push" {
		t.Fatalf("got %q %v", scheme, p)
	}
}
