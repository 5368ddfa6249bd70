package remote

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd"
	"github.com/distribution/distribution/v3/registry/handlers"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"
	"golang.org/x/crypto/bcrypt"

	registry "github.com/starlight-project/starlight/api/remote"
	"github.com/starlight-project/starlight/convert"
)

func init() {
	os.Setenv("OTEL_TRACES_EXPORTER", "none")
}

// startRegistry runs a distribution registry (in memory, htpasswd user
// alice:s3cret) and returns its host.
func startRegistry(t *testing.T) string {
	t.Helper()
	hash, err := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	htpasswd := filepath.Join(t.TempDir(), "htpasswd")
	if err := os.WriteFile(htpasswd, []byte("alice:"+string(hash)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	config := &configuration.Configuration{
		Storage: configuration.Storage{"inmemory": configuration.Parameters{}},
		Auth:    configuration.Auth{"htpasswd": configuration.Parameters{"realm": "test", "path": htpasswd}},
	}
	config.HTTP.Secret = "starlight-test"
	config.Log.Level = "error"
	if !testing.Verbose() {
		logrus.SetLevel(logrus.FatalLevel) // every request is logged, and expected 404s as errors
	}
	srv := httptest.NewServer(handlers.NewApp(context.Background(), config))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

func client(user, pass string) *registry.Client {
	return registry.New(registry.Options{Hosts: registry.StaticHosts(func(string) registry.HostConfig {
		return registry.HostConfig{PlainHTTP: true, Username: user, Password: pass}
	})})
}

// pushImage pushes a one-layer gzip image to ref.
func pushImage(t *testing.T, c *registry.Client, ref string) {
	t.Helper()
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	body := strings.Repeat("hello starlight\n", 100)
	tw.WriteHeader(&tar.Header{Name: "etc/hello.txt", Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg, ModTime: time.Unix(1_600_000_000, 0)})
	tw.Write([]byte(body))
	tw.Close()
	var gb bytes.Buffer
	zw := gzip.NewWriter(&gb)
	zw.Write(tb.Bytes())
	zw.Close()
	layer := gb.Bytes()

	cfg, _ := json.Marshal(ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{digest.FromBytes(tb.Bytes())}},
	})
	m, _ := json.Marshal(ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))},
		Layers:    []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(layer), Size: int64(len(layer))}},
	})
	ctx := context.Background()
	p, err := c.Resolver().Pusher(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range []struct {
		mt   string
		data []byte
	}{{ocispec.MediaTypeImageLayerGzip, layer}, {ocispec.MediaTypeImageConfig, cfg}, {ocispec.MediaTypeImageManifest, m}} {
		desc := ocispec.Descriptor{MediaType: b.mt, Digest: digest.FromBytes(b.data), Size: int64(len(b.data))}
		w, err := p.Push(ctx, desc)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(b.data); err != nil {
			t.Fatal(err)
		}
		if err := w.Commit(ctx, desc.Size, desc.Digest); err != nil {
			t.Fatal(err)
		}
		w.Close()
	}
}

func readManifest(t *testing.T, c *registry.Client, ref string) ocispec.Manifest {
	t.Helper()
	ctx := context.Background()
	r := c.Resolver()
	name, desc, err := r.Resolve(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	f, err := r.Fetcher(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := f.Fetch(ctx, desc)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var m ocispec.Manifest
	if err := json.NewDecoder(rc).Decode(&m); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestConvertBetweenRepositories(t *testing.T) {
	host := startRegistry(t)
	c := client("alice", "s3cret")
	src, dst := host+"/src/app:v1", host+"/dst/app:v1-esgz"
	pushImage(t, c, src)

	ctx := context.Background()
	if _, _, err := New(ctx, src, dst, Options{Client: client("alice", "wrong")}); err == nil {
		t.Fatal("wrong credentials were accepted")
	}
	var progress bytes.Buffer
	store, root, err := New(ctx, src, dst, Options{Client: c, Progress: &progress})
	if err != nil {
		t.Fatal(err)
	}
	res, err := convert.ConvertImage(ctx, store, root, convert.Options{TempDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Tag(ctx, dst, res.Desc); err != nil {
		t.Fatal(err)
	}
	m := readManifest(t, c, dst)
	if len(m.Layers) != 1 || m.Layers[0].Annotations["containerd.io/snapshot/stargz/toc.digest"] == "" {
		t.Fatalf("converted manifest %+v has no eStargz layer", m)
	}
	if !strings.Contains(progress.String(), "tagged") {
		t.Errorf("progress:\n%s", progress.String())
	}
	// The source is untouched.
	if sm := readManifest(t, c, src); sm.Layers[0].Digest == m.Layers[0].Digest {
		t.Fatal("the source layer was replaced")
	}
}
