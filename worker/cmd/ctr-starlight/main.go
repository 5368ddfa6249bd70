// Command ctr-starlight is the Starlight command line: it converts images
// for registries without the Starlight extension, asks the worker to pull,
// lists images, and manages startup traces.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/starlight-project/starlight/api/version"
)

// globalOptions are the flags every subcommand shares.
type globalOptions struct {
	worker    string // the worker's API socket
	namespace string // containerd namespace
	address   string // containerd's socket, for create
}

var global globalOptions

var rootCmd = &cobra.Command{
	Use:           "ctr-starlight",
	Short:         "Starlight: fast container provisioning over the WAN",
	SilenceUsage:  true,
	SilenceErrors: true,
}

func init() {
	rootCmd.Version = version.Get().String() // --version
	rootCmd.PersistentFlags().StringVar(&global.worker, "worker", "/run/starlight/api.sock", "the starlight-worker API socket")
	rootCmd.PersistentFlags().StringVarP(&global.namespace, "namespace", "n", "default", "containerd namespace")
	rootCmd.PersistentFlags().StringVarP(&global.address, "address", "a", "/run/containerd/containerd.sock", "containerd's socket (for create)")
}

func main() {
	if err := rootCmd.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "ctr-starlight:", err)
		os.Exit(1)
	}
}
