package harness

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go/aws"
	"github.com/aws/aws-sdk-go/aws/credentials"
	"github.com/aws/aws-sdk-go/aws/session"
	"github.com/aws/aws-sdk-go/service/s3"
)

// S3Server is a private S3 server: versitygw's posix backend over a
// directory of its own, on an ephemeral port of 127.0.0.1, plain HTTP.
// Each bucket is a directory under Dir/data.
type S3Server struct {
	URL       string // http://127.0.0.1:PORT
	Region    string
	AccessKey string
	SecretKey string
	Dir       string
	proc      *Process
	client    *s3.S3
}

// S3Bucket is a bucket of an S3Server, for RegistryOptions.S3.
type S3Bucket struct {
	*S3Server
	Name string
}

// VersityGWEnv names a versitygw binary to use instead of building one.
const VersityGWEnv = "STARLIGHT_VERSITYGW"

var versitygw struct {
	once sync.Once
	path string
	err  error
}

// VersityGW returns the path of a versitygw binary: $STARLIGHT_VERSITYGW,
// or the one the integration/s3server module pins, built through the go
// command once per process. `go tool -n` keeps the executable in the Go
// build cache, so only the first run on a machine compiles it (minutes);
// later runs find it there.
func VersityGW(t T) string {
	t.Helper()
	versitygw.once.Do(func() {
		if p := os.Getenv(VersityGWEnv); p != "" {
			versitygw.path = p
			return
		}
		cmd := exec.Command("go", "tool", "-n", "versitygw")
		cmd.Dir = filepath.Join(RepoRoot(), "integration", "s3server")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			versitygw.err = fmt.Errorf("build versitygw (go tool -n versitygw in %s): %w\n%s", cmd.Dir, err, stderr.Bytes())
			return
		}
		versitygw.path = strings.TrimSpace(string(out))
	})
	if versitygw.err != nil {
		t.Fatalf("%v", versitygw.err)
	}
	if _, err := os.Stat(versitygw.path); err != nil {
		t.Fatalf("versitygw: %v (unset %s or fix it)", err, VersityGWEnv)
	}
	return versitygw.path
}

// StartS3 starts a private S3 server and stops it (by its PID) in t's
// cleanup; its directory goes with it.
func StartS3(t T) *S3Server {
	t.Helper()
	bin := VersityGW(t)
	dir := ShortTempDir(t, "s3-")
	s := &S3Server{Region: "us-east-1", AccessKey: "starlight-test", SecretKey: "starlight-test-secret", Dir: dir}
	data := filepath.Join(dir, "data")
	if err := os.Mkdir(data, 0o755); err != nil {
		t.Fatalf("s3: %v", err)
	}
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		port, err := FreePort()
		if err != nil {
			t.Fatalf("s3: %v", err)
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		s.URL = "http://" + addr
		s.client = s3.New(session.Must(session.NewSession(&aws.Config{
			Endpoint:         aws.String(s.URL),
			Region:           aws.String(s.Region),
			Credentials:      credentials.NewStaticCredentials(s.AccessKey, s.SecretKey, ""),
			S3ForcePathStyle: aws.Bool(true),
			MaxRetries:       aws.Int(0),
		})))
		p, err := startProcess("versitygw", filepath.Join(dir, "versitygw.log"), nil, bin,
			"--access", s.AccessKey, "--secret", s.SecretKey, "--region", s.Region,
			"--port", addr, "--quiet", "posix", data)
		if err != nil {
			t.Fatalf("s3: %v", err)
		}
		lastErr = waitFor(p, 60*time.Second, s.ping)
		if lastErr == nil {
			s.proc = p
			t.Cleanup(func() {
				p.Stop(10 * time.Second)
				p.dumpOnFailure(t)
			})
			t.Logf("versitygw pid %d on %s (dir %s)", p.PID(), addr, dir)
			return s
		}
		p.Stop(5 * time.Second)
		if !strings.Contains(p.Log(8<<10), "address already in use") {
			t.Fatalf("start versitygw: %v\n%s", lastErr, p.Log(32<<10))
		}
	}
	t.Fatalf("start versitygw: no free port: %v", lastErr)
	return nil
}

// ping succeeds once the server answers an authenticated ListBuckets.
func (s *S3Server) ping() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := s.client.ListBucketsWithContext(ctx, &s3.ListBucketsInput{})
	return err
}

// CreateBucket creates a bucket through the S3 API, as `aws s3 mb` would.
func (s *S3Server) CreateBucket(t T, name string) *S3Bucket {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := s.client.CreateBucketWithContext(ctx, &s3.CreateBucketInput{Bucket: aws.String(name)}); err != nil {
		t.Fatalf("create bucket %s: %v", name, err)
	}
	return &S3Bucket{S3Server: s, Name: name}
}

// KeepDirectory creates key (ending in "/") as a directory object.
// versitygw's posix backend removes a directory that a delete leaves
// empty, unless it is such an object, and its PutObject fails with
// ExistingObjectIsDirectory when a concurrent delete removes a parent it
// is creating (versitygw v1.8.0: backend.MkdirAll, then os.Mkdir, is not
// retried on ENOENT). Distribution deletes every finished upload under
// <repository>/_uploads/, so concurrent pushes to one repository hit
// that; keeping _uploads/ in place avoids it. AWS S3 has no directories.
func (b *S3Bucket) KeepDirectory(t T, key string) {
	t.Helper()
	if !strings.HasSuffix(key, "/") {
		t.Fatalf("directory object %q must end in /", key)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := b.client.PutObjectWithContext(ctx, &s3.PutObjectInput{
		Bucket: aws.String(b.Name), Key: aws.String(key), Body: bytes.NewReader(nil),
	}); err != nil {
		t.Fatalf("create directory object %s in bucket %s: %v", key, b.Name, err)
	}
}

// KeepUploads keeps the upload directory of repo in the registry storage
// of the bucket (see KeepDirectory).
func (b *S3Bucket) KeepUploads(t T, repo string) {
	t.Helper()
	b.KeepDirectory(t, "docker/registry/v2/repositories/"+repo+"/_uploads/")
}

// Keys lists the object keys of the bucket under prefix, through the S3 API.
func (b *S3Bucket) Keys(t T, prefix string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var keys []string
	err := b.client.ListObjectsV2PagesWithContext(ctx, &s3.ListObjectsV2Input{
		Bucket: aws.String(b.Name), Prefix: aws.String(prefix),
	}, func(page *s3.ListObjectsV2Output, _ bool) bool {
		for _, o := range page.Contents {
			keys = append(keys, aws.StringValue(o.Key))
		}
		return true
	})
	if err != nil {
		t.Fatalf("list bucket %s under %q: %v", b.Name, prefix, err)
	}
	return keys
}

// Log returns the tail of the server's log.
func (s *S3Server) Log() string { return s.proc.Log(64 << 10) }
