package criproxy

import (
	"context"
	"net"
	"path/filepath"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/starlight-project/starlight/api/remote"
)

// fakeImages is containerd's CRI image service as far as the proxy sees
// it. During a PullImage it asks the proxy's Secrets what a Prepare would.
type fakeImages struct {
	runtime.UnimplementedImageServiceServer
	secrets *Secrets
	seen    map[string]remote.Credential // by image: the credential for its host during the pull
}

func (f *fakeImages) PullImage(_ context.Context, r *runtime.PullImageRequest) (*runtime.PullImageResponse, error) {
	ref, err := NormalizeRef(r.GetImage().GetImage())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if creds, ok := f.secrets.Credentials(ref); ok {
		c, _ := creds("registry.example.com:5000")
		f.seen[ref] = c
	}
	if r.GetImage().GetImage() == "registry.example.com:5000/private:v1" && r.GetAuth() == nil {
		return nil, status.Error(codes.Unknown, "failed to resolve reference: 401 Unauthorized")
	}
	return &runtime.PullImageResponse{ImageRef: "sha256:0123"}, nil
}

func (f *fakeImages) ListImages(context.Context, *runtime.ListImagesRequest) (*runtime.ListImagesResponse, error) {
	return &runtime.ListImagesResponse{Images: []*runtime.Image{{Id: "sha256:0123", RepoTags: []string{"registry.example.com:5000/app:v1"}}}}, nil
}

// serve serves srv on a unix socket in dir and returns a client of it.
func serve(t *testing.T, srv *grpc.Server, sock string) *grpc.ClientConn {
	t.Helper()
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func TestProxy(t *testing.T) {
	dir := t.TempDir()
	secrets := NewSecrets()
	fake := &fakeImages{secrets: secrets, seen: map[string]remote.Credential{}}
	backend := grpc.NewServer()
	runtime.RegisterImageServiceServer(backend, fake)
	backendConn := serve(t, backend, filepath.Join(dir, "containerd.sock"))
	client := runtime.NewImageServiceClient(serve(t, New(backendConn, secrets, nil).Server(), filepath.Join(dir, "cri.sock")))
	ctx := context.Background()

	// Other methods pass through.
	list, err := client.ListImages(ctx, &runtime.ListImagesRequest{})
	if err != nil || len(list.Images) != 1 || list.Images[0].RepoTags[0] != "registry.example.com:5000/app:v1" {
		t.Fatalf("ListImages through the proxy: %v, %v", list, err)
	}

	tests := []struct {
		name  string
		image string
		auth  *runtime.AuthConfig
		want  remote.Credential // seen by the Prepares of the pull
		code  codes.Code
	}{
		{name: "username and password", image: "registry.example.com:5000/app:v1",
			auth: &runtime.AuthConfig{Username: "alice", Password: "pw", ServerAddress: "registry.example.com:5000"},
			want: remote.Credential{Username: "alice", Secret: "pw", Source: Source}},
		{name: "auth string", image: "registry.example.com:5000/app:v2",
			auth: &runtime.AuthConfig{Auth: "Ym9iOnNlY3JldA=="}, // bob:secret
			want: remote.Credential{Username: "bob", Secret: "secret", Source: Source}},
		{name: "identity token", image: "registry.example.com:5000/app:v3",
			auth: &runtime.AuthConfig{IdentityToken: "tok", ServerAddress: "https://registry.example.com:5000/v2/"},
			want: remote.Credential{Secret: "tok", Source: Source}},
		{name: "another server", image: "registry.example.com:5000/app:v4",
			auth: &runtime.AuthConfig{Username: "alice", Password: "pw", ServerAddress: "other.example.com"},
			want: remote.Credential{Source: Source}},
		{name: "no credentials", image: "registry.example.com:5000/app:v5"},
		{name: "the registry's refusal passes through", image: "registry.example.com:5000/private:v1", code: codes.Unknown},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := client.PullImage(ctx, &runtime.PullImageRequest{Image: &runtime.ImageSpec{Image: tc.image}, Auth: tc.auth})
			if status.Code(err) != tc.code {
				t.Fatalf("PullImage: %v, want code %v", err, tc.code)
			}
			ref, _ := NormalizeRef(tc.image)
			got, seen := fake.seen[ref]
			if seen != (tc.auth != nil) || got != tc.want {
				t.Errorf("credentials during the pull: %+v (seen %v), want %+v", got, seen, tc.want)
			}
			if _, ok := secrets.Credentials(ref); ok {
				t.Errorf("the credentials of %s are still held after the pull", ref)
			}
		})
	}
}

func TestNormalizeRef(t *testing.T) {
	for in, want := range map[string]string{
		"redis":                         "docker.io/library/redis:latest",
		"registry.example.com:5000/a/b": "registry.example.com:5000/a/b:latest",
		"127.0.0.1:5000/app:v1":         "127.0.0.1:5000/app:v1",
		"docker.io/library/redis:7@sha256:" + sixtyFour: "docker.io/library/redis@sha256:" + sixtyFour,
	} {
		if got, err := NormalizeRef(in); err != nil || got != want {
			t.Errorf("NormalizeRef(%q) = %q, %v, want %q", in, got, err, want)
		}
	}
	if _, err := NormalizeRef("app/Upper:v1"); err == nil {
		t.Error("NormalizeRef accepted an invalid reference")
	}
}

const sixtyFour = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
