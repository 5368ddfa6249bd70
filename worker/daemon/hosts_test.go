package daemon

import (
	"context"
	"encoding/base64"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/config"
)

// The worker's registry client takes credentials from its [[registry]]
// entries first, then from the docker config.json, and names the source
// when they are refused.
func TestRegistryHostsCredentials(t *testing.T) {
	var gotUser string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u, p, ok := r.BasicAuth()
		if !ok || p != "right" {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"code":"UNAUTHORIZED","message":"authentication required"}`)
			return
		}
		gotUser = u
		w.Header().Set("Content-Type", api.MediaTypeBundle)
		io.WriteString(w, "bundle")
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	dockerCfg := filepath.Join(t.TempDir(), "config.json")
	writeDockerConfig := func(user, pass string) {
		auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
		if err := os.WriteFile(dockerCfg, []byte(`{"auths":{"`+host+`":{"auth":"`+auth+`"}}}`), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	pull := func(cfg *config.Config) error {
		body, err := newRemote(registryHosts(cfg, nil)).Delta(context.Background(), host, "app", api.DeltaRequest{Reference: "app:v1"})
		if err == nil {
			body.Close()
		}
		return err
	}
	cfg := config.Default()
	cfg.ConfigPath = t.TempDir()
	cfg.DockerConfig = dockerCfg

	writeDockerConfig("from-docker", "right")
	cfg.Registries = []config.Registry{{Host: host, PlainHTTP: true}}
	if err := pull(cfg); err != nil || gotUser != "from-docker" {
		t.Fatalf("docker config credentials: user %q, %v", gotUser, err)
	}

	cfg.Registries = []config.Registry{{Host: host, PlainHTTP: true, Username: "from-worker", Password: "right"}}
	writeDockerConfig("from-docker", "wrong")
	if err := pull(cfg); err != nil || gotUser != "from-worker" {
		t.Fatalf("worker config credentials: user %q, %v", gotUser, err)
	}

	cfg.Registries = []config.Registry{{Host: host, PlainHTTP: true}}
	err := pull(cfg)
	if want := host + ": authentication failed with credentials from " + dockerCfg; err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("error %v, want one containing %q", err, want)
	}
	if strings.Contains(err.Error(), "wrong") {
		t.Fatalf("the error shows the password: %v", err)
	}
}
