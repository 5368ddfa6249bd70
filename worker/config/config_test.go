package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

func TestParseRegistryURL(t *testing.T) {
	tests := []struct {
		in      string
		want    Registry
		wantErr string
	}{
		{in: "http://127.0.0.1:5000", want: Registry{Host: "127.0.0.1:5000", PlainHTTP: true}},
		{in: "https://registry.example.com", want: Registry{Host: "registry.example.com"}},
		{in: "registry.example.com:443", want: Registry{Host: "registry.example.com:443"}},
		{in: "http://alice:s3cret@localhost:5000/", want: Registry{Host: "localhost:5000", PlainHTTP: true, Username: "alice", Password: "s3cret"}},
		{in: "ftp://host", wantErr: "scheme must be http or https"},
		{in: "http://host/v2/repo", wantErr: "not a path"},
		{in: "http://", wantErr: "no host"},
		{in: "http://bob:hunter2@host/x", wantErr: "xxxxx"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseRegistryURL(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
				}
				if strings.Contains(err.Error(), "hunter2") {
					t.Fatalf("error leaks the password: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func load(t *testing.T, args ...string) (*Config, error) {
	t.Helper()
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	f := AddFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	return f.Load()
}

func TestLoadPrecedence(t *testing.T) {
	pw := writeFile(t, "pw", "  from-file\n")
	file := writeFile(t, "config.toml", `
root = "/srv/starlight"
api = "/tmp/file-api.sock"
metrics = "127.0.0.1:9100"
log_level = "debug"
allow_plain_fallback = true
demand_fetches = 0
config_path = "/srv/certs.d"
docker_config = "/srv/docker/config.json"

[[registry]]
host = "127.0.0.1:5000"
plain_http = true
username = "alice"
password_file = "`+pw+`"

[[registry]]
host = "registry.example.com"
`)

	tests := []struct {
		name string
		args []string
		want func(c *Config)
	}{
		{
			name: "defaults",
			args: nil,
			want: func(c *Config) { *c = *Default() },
		},
		{
			name: "file",
			args: []string{"--config", file},
			want: func(c *Config) {
				*c = *Default()
				c.Root = "/srv/starlight"
				c.API = "/tmp/file-api.sock"
				c.Metrics = "127.0.0.1:9100"
				c.LogLevel = "debug"
				c.AllowPlainFallback = true
				c.DemandFetches = 0
				c.ConfigPath = "/srv/certs.d"
				c.DockerConfig = "/srv/docker/config.json"
				c.Registries = []Registry{
					{Host: "127.0.0.1:5000", PlainHTTP: true, Username: "alice", Password: "from-file", PasswordFile: pw},
					{Host: "registry.example.com"},
				}
			},
		},
		{
			name: "flags override the file",
			args: []string{"--config", file, "--root", "/flag/root", "--log-level", "warn", "--demand-fetches", "3",
				"--hosts-dir", "", "--docker-config", "/flag/config.json",
				"--registry", "https://bob:pw@127.0.0.1:5000", "--registry", "http://other:5001"},
			want: func(c *Config) {
				*c = *Default()
				c.Root = "/flag/root"
				c.DemandFetches = 3
				c.ConfigPath = ""
				c.DockerConfig = "/flag/config.json"
				c.API = "/tmp/file-api.sock"
				c.Metrics = "127.0.0.1:9100"
				c.LogLevel = "warn"
				c.AllowPlainFallback = true
				c.Registries = []Registry{
					{Host: "127.0.0.1:5000", Username: "bob", Password: "pw"},
					{Host: "registry.example.com"},
					{Host: "other:5001", PlainHTTP: true},
				}
			},
		},
		{
			name: "flags without file",
			args: []string{"--address", "/tmp/sn.sock", "--containerd", "/tmp/c.sock", "--api", "/tmp/a.sock", "--metrics", ":0"},
			want: func(c *Config) {
				*c = *Default()
				c.Address = "/tmp/sn.sock"
				c.Containerd = "/tmp/c.sock"
				c.API = "/tmp/a.sock"
				c.Metrics = ":0"
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := load(t, tt.args...)
			if err != nil {
				t.Fatal(err)
			}
			want := &Config{}
			tt.want(want)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("got  %+v\nwant %+v", got, want)
			}
		})
	}
}

func TestLoadErrors(t *testing.T) {
	tests := []struct {
		name    string
		file    string
		args    []string
		wantErr string
	}{
		{name: "unknown key", file: "roots = \"/x\"\n", wantErr: "unknown keys: roots"},
		{name: "bad toml", file: "root = \n", wantErr: "reading config"},
		{name: "duplicate host", file: "[[registry]]\nhost = \"a\"\n[[registry]]\nhost = \"a\"\n", wantErr: "configured twice"},
		{name: "missing password file", file: "[[registry]]\nhost = \"a\"\npassword_file = \"/nonexistent/pw\"\n", wantErr: "password_file"},
		{name: "bad log level", args: []string{"--log-level", "loud"}, wantErr: "unknown log level"},
		{name: "bad registry flag", args: []string{"--registry", "ftp://x"}, wantErr: "--registry"},
		{name: "bad concurrency", file: "max_concurrent_pulls = 0\n", wantErr: "max_concurrent_pulls"},
		{name: "negative demand fetches", args: []string{"--demand-fetches", "-1"}, wantErr: "demand_fetches"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := tt.args
			if tt.file != "" {
				args = append([]string{"--config", writeFile(t, "c.toml", tt.file)}, args...)
			}
			_, err := load(t, args...)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestRegistryLookup(t *testing.T) {
	c := Default()
	c.Registries = []Registry{{Host: "127.0.0.1:5000", PlainHTTP: true}, {Host: "reg.example.com"}}
	tests := []struct {
		host    string
		ok      bool
		baseURL string
	}{
		{"127.0.0.1:5000", true, "http://127.0.0.1:5000"},
		{"reg.example.com", true, "https://reg.example.com"},
		{"127.0.0.1:5001", false, ""},
		{"docker.io", false, ""},
	}
	for _, tt := range tests {
		r, ok := c.Registry(tt.host)
		if ok != tt.ok || (ok && r.BaseURL() != tt.baseURL) {
			t.Errorf("Registry(%q) = %v, %v; want base %q, %v", tt.host, r.BaseURL(), ok, tt.baseURL, tt.ok)
		}
	}
}

func TestExampleConfigParses(t *testing.T) {
	// The documented example must stay loadable.
	c, err := LoadFile("../../deploy/worker/config.toml.example")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Registries) == 0 {
		t.Fatal("example documents no registry")
	}
}
