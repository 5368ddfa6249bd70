package dockerconfig

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/starlight-project/starlight/api/remote"
)

// TestMain doubles as a credential helper: run under the name
// docker-credential-* (a symlink to the test binary), it answers `get`
// from the JSON object in $FAKE_HELPER_STORE (server → [user, secret]),
// logging the server it was asked for to $FAKE_HELPER_LOG.
func TestMain(m *testing.M) {
	if strings.HasPrefix(filepath.Base(os.Args[0]), "docker-credential-") {
		os.Exit(fakeHelper())
	}
	os.Exit(m.Run())
}

func fakeHelper() int {
	if len(os.Args) != 2 || os.Args[1] != "get" {
		fmt.Println("unsupported action")
		return 1
	}
	in, _ := io.ReadAll(os.Stdin)
	server := strings.TrimSpace(string(in))
	if p := os.Getenv("FAKE_HELPER_LOG"); p != "" {
		f, _ := os.OpenFile(p, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
		fmt.Fprintln(f, filepath.Base(os.Args[0]), server)
		f.Close()
	}
	if os.Getenv("FAKE_HELPER_HANG") != "" {
		time.Sleep(time.Minute)
	}
	if os.Getenv("FAKE_HELPER_CRASH") != "" {
		fmt.Println("the keychain is locked")
		return 1
	}
	var store map[string][2]string
	json.Unmarshal([]byte(os.Getenv("FAKE_HELPER_STORE")), &store)
	c, ok := store[server]
	if !ok {
		fmt.Println("credentials not found in native keychain")
		return 1
	}
	json.NewEncoder(os.Stdout).Encode(map[string]string{"ServerURL": server, "Username": c[0], "Secret": c[1]})
	return 0
}

// installHelpers puts docker-credential-NAME for every name on a $PATH of
// its own, and returns the file the helpers log their calls to.
func installHelpers(t *testing.T, store map[string][2]string, names ...string) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, n := range names {
		if err := os.Symlink(exe, filepath.Join(dir, "docker-credential-"+n)); err != nil {
			t.Fatal(err)
		}
	}
	b, _ := json.Marshal(store)
	t.Setenv("PATH", dir)
	t.Setenv("FAKE_HELPER_STORE", string(b))
	logPath := filepath.Join(dir, "calls.log")
	t.Setenv("FAKE_HELPER_LOG", logPath)
	return logPath
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func TestCredentials(t *testing.T) {
	store := map[string][2]string{
		"helper.example.com":          {"hank", "from-helper"},
		"store.example.com":           {"sam", "from-store"},
		"https://index.docker.io/v1/": {"dana", "hub-secret"},
		"token.example.com":           {"<token>", "identity-from-helper"},
	}
	tests := []struct {
		name    string
		config  string // "" means no file
		host    string
		want    remote.Credential // Source: "FILE" is the config path
		wantErr string
		calls   string // the helper calls logged, one "name server" a line
	}{
		{name: "missing file", host: "registry.example.com", want: remote.Credential{Source: "FILE"}},
		{name: "empty file", config: " ", host: "registry.example.com", want: remote.Credential{Source: "FILE"}},
		{name: "auth field", config: `{"auths":{"registry.example.com":{"auth":"` + b64("alice:pa:ss") + `"}}}`,
			host: "registry.example.com", want: remote.Credential{Username: "alice", Secret: "pa:ss", Source: "FILE"}},
		{name: "auth key with scheme and path", config: `{"auths":{"https://registry.example.com/v2/":{"auth":"` + b64("alice:pw") + `"}}}`,
			host: "registry.example.com", want: remote.Credential{Username: "alice", Secret: "pw", Source: "FILE"}},
		{name: "username and password", config: `{"auths":{"127.0.0.1:5000":{"username":"bob","password":"pw"}}}`,
			host: "127.0.0.1:5000", want: remote.Credential{Username: "bob", Secret: "pw", Source: "FILE"}},
		{name: "identity token", config: `{"auths":{"registry.example.com":{"auth":"` + b64("bob:x") + `","identitytoken":"refresh"}}}`,
			host: "registry.example.com", want: remote.Credential{Secret: "refresh", Source: "FILE"}},
		{name: "docker hub", config: `{"auths":{"https://index.docker.io/v1/":{"auth":"` + b64("dana:pw") + `"}}}`,
			host: "registry-1.docker.io", want: remote.Credential{Username: "dana", Secret: "pw", Source: "FILE"}},
		{name: "other host", config: `{"auths":{"registry.example.com":{"auth":"` + b64("alice:pw") + `"}}}`,
			host: "registry.example.com:5000", want: remote.Credential{Source: "FILE"}},
		{name: "empty entry", config: `{"auths":{"registry.example.com":{}}}`,
			host: "registry.example.com", want: remote.Credential{Source: "FILE"}},
		{name: "bad base64", config: `{"auths":{"registry.example.com":{"auth":"%%%secret"}}}`,
			host: "registry.example.com", wantErr: "the auth of registry.example.com is not base64"},
		{name: "auth without colon", config: `{"auths":{"registry.example.com":{"auth":"` + b64("secretonly") + `"}}}`,
			host: "registry.example.com", wantErr: "is not user:password"},
		{name: "invalid JSON", config: `{"auths": {"registry.example.com": {"auth": "c2VjcmV0"`,
			host: "registry.example.com", wantErr: "invalid JSON"},
		{name: "credHelpers per host", config: `{"credHelpers":{"helper.example.com":"fake"},"auths":{"helper.example.com":{"auth":"` + b64("not:used") + `"}}}`,
			host: "helper.example.com", want: remote.Credential{Username: "hank", Secret: "from-helper", Source: "docker-credential-fake (credHelpers in FILE)"},
			calls: "docker-credential-fake helper.example.com\n"},
		{name: "credHelpers other host falls to auths", config: `{"credHelpers":{"helper.example.com":"fake"},"auths":{"registry.example.com":{"auth":"` + b64("alice:pw") + `"}}}`,
			host: "registry.example.com", want: remote.Credential{Username: "alice", Secret: "pw", Source: "FILE"}},
		{name: "credHelpers win over credsStore", config: `{"credsStore":"store","credHelpers":{"helper.example.com":"fake"}}`,
			host: "helper.example.com", want: remote.Credential{Username: "hank", Secret: "from-helper", Source: "docker-credential-fake (credHelpers in FILE)"},
			calls: "docker-credential-fake helper.example.com\n"},
		{name: "credsStore", config: `{"credsStore":"store"}`,
			host: "store.example.com", want: remote.Credential{Username: "sam", Secret: "from-store", Source: "docker-credential-store (credsStore in FILE)"},
			calls: "docker-credential-store store.example.com\n"},
		{name: "credsStore for docker hub", config: `{"credsStore":"store"}`,
			host: "docker.io", want: remote.Credential{Username: "dana", Secret: "hub-secret", Source: "docker-credential-store (credsStore in FILE)"},
			calls: "docker-credential-store https://index.docker.io/v1/\n"},
		{name: "helper identity token", config: `{"credsStore":"store"}`,
			host: "token.example.com", want: remote.Credential{Secret: "identity-from-helper", Source: "docker-credential-store (credsStore in FILE)"},
			calls: "docker-credential-store token.example.com\n"},
		{name: "helper says not found", config: `{"credsStore":"store"}`,
			host: "nowhere.example.com", want: remote.Credential{Source: "docker-credential-store (credsStore in FILE)"},
			calls: "docker-credential-store nowhere.example.com\n"},
		{name: "helper not installed", config: `{"credHelpers":{"registry.example.com":"missing"}}`,
			host: "registry.example.com", wantErr: "docker-credential-missing (credHelpers in FILE): the helper is not installed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logPath := installHelpers(t, store, "fake", "store")
			path := filepath.Join(t.TempDir(), "config.json")
			if tt.config != "" {
				if err := os.WriteFile(path, []byte(tt.config), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			f := &File{Path: path}
			got, err := f.Credentials(tt.host)
			if tt.wantErr != "" {
				want := strings.ReplaceAll(tt.wantErr, "FILE", path)
				if err == nil || !strings.Contains(err.Error(), want) {
					t.Fatalf("error %v, want one containing %q", err, want)
				}
				for _, secret := range []string{"secret", "c2VjcmV0"} {
					if strings.Contains(err.Error(), secret) {
						t.Fatalf("the error shows the secret: %v", err)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.want.Source = strings.ReplaceAll(tt.want.Source, "FILE", path)
			if got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
			calls, _ := os.ReadFile(logPath)
			if string(calls) != tt.calls {
				t.Fatalf("helper calls %q, want %q", calls, tt.calls)
			}
		})
	}
}

func TestHelperFailures(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(path, []byte(`{"credsStore":"store"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Run("crash", func(t *testing.T) {
		installHelpers(t, nil, "store")
		t.Setenv("FAKE_HELPER_CRASH", "1")
		_, err := (&File{Path: path}).Credentials("registry.example.com")
		if err == nil || !strings.Contains(err.Error(), "docker-credential-store (credsStore in "+path+")") || !strings.Contains(err.Error(), "the keychain is locked") {
			t.Fatalf("error %v", err)
		}
	})
	t.Run("hang", func(t *testing.T) {
		installHelpers(t, nil, "store")
		t.Setenv("FAKE_HELPER_HANG", "1")
		start := time.Now()
		_, err := (&File{Path: path, HelperTimeout: 300 * time.Millisecond}).Credentials("registry.example.com")
		if err == nil || !strings.Contains(err.Error(), "no answer in 300ms") {
			t.Fatalf("error %v", err)
		}
		if d := time.Since(start); d > 20*time.Second {
			t.Fatalf("took %s", d)
		}
	})
}

func TestDefaultPath(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", "/etc/docker-config")
	if p := DefaultPath(); p != "/etc/docker-config/config.json" {
		t.Fatalf("with DOCKER_CONFIG: %s", p)
	}
	t.Setenv("DOCKER_CONFIG", "")
	t.Setenv("HOME", "/home/someone")
	if p := DefaultPath(); p != "/home/someone/.docker/config.json" {
		t.Fatalf("with HOME: %s", p)
	}
	// The Path of a File wins.
	f := &File{Path: filepath.Join(t.TempDir(), "absent.json")}
	if c, err := f.Credentials("x.example.com"); err != nil || c.Source != f.Path {
		t.Fatalf("%+v, %v", c, err)
	}
}
