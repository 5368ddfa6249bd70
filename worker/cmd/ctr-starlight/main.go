// Command ctr-starlight is the Starlight command line: it converts images
// for registries without the Starlight extension, asks the worker to pull,
// lists images, and manages startup traces.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/starlight-project/starlight/api/version"
)

// globalOptions are the flags every subcommand shares.
type globalOptions struct {
	worker    string // the worker's API socket
	namespace string // containerd namespace
	address   string // containerd's socket, for create; "" asks the worker
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
	addGlobalFlags(rootCmd.PersistentFlags(), &global, os.Getenv)
}

// addGlobalFlags defines the shared flags. As with ctr, CONTAINERD_ADDRESS
// and CONTAINERD_NAMESPACE are the defaults of --address and --namespace,
// and a flag given wins.
func addGlobalFlags(fs *pflag.FlagSet, g *globalOptions, getenv func(string) string) {
	namespace := getenv("CONTAINERD_NAMESPACE")
	if namespace == "" {
		namespace = "default"
	}
	fs.StringVar(&g.worker, "worker", "/run/starlight/api.sock", "the starlight-worker API socket")
	fs.StringVarP(&g.namespace, "namespace", "n", namespace, "containerd namespace [$CONTAINERD_NAMESPACE]")
	fs.StringVarP(&g.address, "address", "a", getenv("CONTAINERD_ADDRESS"),
		"containerd's socket, for create [$CONTAINERD_ADDRESS] (default: the containerd the worker uses)")
}

func main() {
	if err := rootCmd.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "ctr-starlight:", err)
		os.Exit(1)
	}
}
