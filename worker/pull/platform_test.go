package pull

import (
	"runtime"
	"strings"
	"testing"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/config"
)

func TestDefaultPlatform(t *testing.T) {
	if DefaultPlatform.OS != runtime.GOOS || DefaultPlatform.Architecture != runtime.GOARCH {
		t.Errorf("DefaultPlatform %v, want the host's %s/%s", DefaultPlatform, runtime.GOOS, runtime.GOARCH)
	}
	if runtime.GOARCH == "arm64" && DefaultPlatform.Variant != "" {
		t.Errorf("DefaultPlatform %v: arm64/v8 is normalised to arm64", DefaultPlatform)
	}
}

func TestParsePlatform(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    api.Platform
		wantErr string
	}{
		{"", DefaultPlatform, ""},
		{"linux/amd64", api.Platform{OS: "linux", Architecture: "amd64"}, ""},
		{"linux/arm64", api.Platform{OS: "linux", Architecture: "arm64"}, ""},
		{"linux/arm64/v8", api.Platform{OS: "linux", Architecture: "arm64"}, ""},
		{"linux/aarch64", api.Platform{OS: "linux", Architecture: "arm64"}, ""},
		{"Linux/x86_64", api.Platform{OS: "linux", Architecture: "amd64"}, ""},
		{"linux/arm", api.Platform{OS: "linux", Architecture: "arm", Variant: "v7"}, ""},
		{"linux/arm/v6", api.Platform{OS: "linux", Architecture: "arm", Variant: "v6"}, ""},
		{"arm64", api.Platform{OS: runtime.GOOS, Architecture: "arm64"}, ""},
		{"linux/arm64/v8/extra", api.Platform{}, "invalid platform"},
		{"linux/*", api.Platform{}, "invalid platform"},
		{"lin ux/amd64", api.Platform{}, "e.g. linux/arm64"},
		{"nosuchthing", api.Platform{}, "unknown operating system or architecture"},
		{"windows(10.0.17763)/amd64", api.Platform{}, "OS version"},
	} {
		got, err := ParsePlatform(tc.in)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("ParsePlatform(%q) = %v, %v; want an error with %q", tc.in, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParsePlatform(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
		}
	}
}

func TestConfigPlatform(t *testing.T) {
	for cfg, want := range map[string]string{
		`{"os":"linux","architecture":"arm64","variant":"v8"}`: "linux/arm64",
		`{"os":"linux","architecture":"amd64"}`:                "linux/amd64",
		`{"os":"linux","architecture":"arm","variant":"v6"}`:   "linux/arm/v6",
		`{"architecture":"amd64"}`:                             "",
		`{}`:                                                   "",
		`not json`:                                             "",
	} {
		p, ok := configPlatform([]byte(cfg))
		if got := p.String(); ok != (want != "") || ok && got != want {
			t.Errorf("configPlatform(%s) = %q, %t; want %q", cfg, got, ok, want)
		}
	}
}

func TestStartRejectsInvalidPlatform(t *testing.T) {
	pl, err := New(config.Default(), Deps{RecordDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer pl.Close()
	_, err = pl.Start(api.PullRequest{Ref: "registry.example:5000/app:v1", Platform: "linux/arm64/v8/x"})
	if err == nil || !strings.Contains(err.Error(), "invalid platform") || !strings.Contains(err.Error(), "linux/arm64/v8/x") {
		t.Fatalf("Start with a bad platform: %v", err)
	}
}
