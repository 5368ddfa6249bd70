// Command starlight-registry is the CNCF distribution registry with the
// Starlight extension linked in. Its command line and configuration are
// distribution's own ("starlight-registry serve config.yml",
// "starlight-registry garbage-collect config.yml"); the extension is
// enabled by listing "starlight" under middleware.registry and
// middleware.repository (see config.yml.example).
package main

import (
	"fmt"
	"io"
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
	_ "github.com/distribution/distribution/v3/registry/storage/driver/s3-aws"
	distversion "github.com/distribution/distribution/v3/version"
	"github.com/spf13/cobra"

	"github.com/starlight-project/starlight/api/version"
	registryext "github.com/starlight-project/starlight/registry-ext"
)

func main() {
	// Without a collector, distribution's OpenTelemetry exporter logs an
	// error for every batch of spans; opt in explicitly to get traces.
	if _, ok := os.LookupEnv("OTEL_TRACES_EXPORTER"); !ok {
		os.Setenv("OTEL_TRACES_EXPORTER", "none")
	}
	registry.RootCmd.Use = "starlight-registry"
	wrapVersion(registry.RootCmd)
	// RootCmd exits non-zero by itself when a subcommand fails. After a
	// graceful stop (SIGTERM), conversions in progress go back to the
	// queue for the next start.
	registry.RootCmd.Execute() //nolint:errcheck
	registryext.CloseAll()
}

// distributionModule is the module of distribution linked in.
const distributionModule = "github.com/distribution/distribution/v3"

// wrapVersion makes distribution's --version (-v) print Starlight's
// version and commit, then the distribution version linked in.
func wrapVersion(root *cobra.Command) {
	run := root.Run
	root.Run = func(cmd *cobra.Command, args []string) {
		if v, err := cmd.Flags().GetBool("version"); err == nil && v {
			printVersion(cmd.OutOrStdout())
			return
		}
		run(cmd, args)
	}
}

func printVersion(w io.Writer) {
	fmt.Fprintln(w, version.Line("starlight-registry"))
	dv := version.Module(distributionModule)
	if dv == "" {
		dv = distversion.Version() // "v3.x.y+unknown" unless set at build time
	}
	fmt.Fprintln(w, "distribution", dv)
}
