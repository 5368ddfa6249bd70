// Command starlight-registry is the CNCF distribution registry with the
// Starlight extension linked in. Its command line and configuration are
// distribution's own ("starlight-registry serve config.yml",
// "starlight-registry garbage-collect config.yml"); the extension is
// enabled by listing "starlight" under middleware.registry and
// middleware.repository (see config.yml.example).
package main

import (
	_ "net/http/pprof"
	"os"

	"github.com/distribution/distribution/v3/registry"
	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd"
	_ "github.com/distribution/distribution/v3/registry/auth/silly"
	_ "github.com/distribution/distribution/v3/registry/auth/token"
	_ "github.com/distribution/distribution/v3/registry/proxy"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/middleware/redirect"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/middleware/rewrite"

	registryext "github.com/starlight-project/starlight/registry-ext"
)

func main() {
	// Without a collector, distribution's OpenTelemetry exporter logs an
	// error for every batch of spans; opt in explicitly to get traces.
	if _, ok := os.LookupEnv("OTEL_TRACES_EXPORTER"); !ok {
		os.Setenv("OTEL_TRACES_EXPORTER", "none")
	}
	registry.RootCmd.Use = "starlight-registry"
	// RootCmd exits non-zero by itself when a subcommand fails. After a
	// graceful stop (SIGTERM), conversions in progress go back to the
	// queue for the next start.
	registry.RootCmd.Execute() //nolint:errcheck
	registryext.CloseAll()
}
