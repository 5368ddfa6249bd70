package daemon

import (
	"context"
	"net"
	"net/http"
	"path/filepath"
	"testing"

	"github.com/starlight-project/starlight/api/version"
	"github.com/starlight-project/starlight/worker/client"
	"github.com/starlight-project/starlight/worker/config"
	"github.com/starlight-project/starlight/worker/pull"
)

func TestInfoRoute(t *testing.T) {
	cfg := config.Default()
	cfg.Containerd = "/run/test/containerd.sock"
	cfg.Root = "/var/lib/starlight-test"
	d := &Daemon{cfg: cfg}
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: d.APIHandler()}
	go srv.Serve(l)
	defer srv.Close()

	c := client.New(sock)
	defer c.Close()
	info, err := c.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	v := version.Get()
	if info.Containerd != cfg.Containerd || info.Root != cfg.Root || info.Address != cfg.Address ||
		info.Version != v.Version || info.Commit != v.Commit || info.Platform != pull.DefaultPlatform.String() {
		t.Errorf("info %+v", info)
	}
}
