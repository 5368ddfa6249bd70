// Command starlight-worker is Starlight's worker daemon: a containerd proxy
// snapshotter whose layers are FUSE views filled by one delta bundle per
// image, and the API ctr-starlight talks to.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/containerd/log"
	"github.com/spf13/cobra"

	"github.com/starlight-project/starlight/api/version"
	"github.com/starlight-project/starlight/worker/config"
	"github.com/starlight-project/starlight/worker/daemon"
)

func main() {
	if err := newCommand().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "starlight-worker:", err)
		os.Exit(1)
	}
}

func newCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:           "starlight-worker",
		Short:         "Starlight worker: lazy-pulling containerd snapshotter",
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version.Get().String(), // --version
	}
	flags := config.AddFlags(cmd.Flags())
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := flags.Load()
		if err != nil {
			return err
		}
		if err := log.SetLevel(cfg.LogLevel); err != nil {
			return err
		}
		if err := log.SetFormat(log.TextFormat); err != nil {
			return err
		}
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
		defer stop()
		d, err := daemon.New(ctx, cfg)
		if err != nil {
			return err
		}
		return d.Serve(ctx, nil)
	}
	return cmd
}
