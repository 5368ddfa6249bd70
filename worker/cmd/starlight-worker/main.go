// Command starlight-worker is Starlight's worker daemon: a containerd proxy
// snapshotter whose layers are FUSE views filled by one delta bundle per
// image, and the API ctr-starlight talks to.
package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/spf13/cobra"

	"github.com/starlight-project/starlight/api/version"
	"github.com/starlight-project/starlight/worker/config"
	"github.com/starlight-project/starlight/worker/daemon"
	"github.com/starlight-project/starlight/worker/fdstore"
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
	cmd.AddCommand(newHolderCommand())
	return cmd
}

// newHolderCommand is `starlight-worker fd-holder`: the process that keeps
// the worker's FUSE connections while no worker runs (package fdstore).
// The worker starts it when it needs one; it exits once it holds nothing
// and no worker is connected.
func newHolderCommand() *cobra.Command {
	var (
		socket string
		stay   bool
	)
	cmd := &cobra.Command{
		Use:   "fd-holder",
		Short: "Keep the worker's FUSE connections across its restarts (started by the worker)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if socket == "" {
				return fmt.Errorf("--socket is required")
			}
			if err := log.SetFormat(log.TextFormat); err != nil {
				return err
			}
			// A holder outlives the worker's terminal and session; only
			// SIGTERM (or SIGKILL) from someone who means it stops it,
			// and then the views it keeps end.
			signal.Ignore(syscall.SIGHUP, syscall.SIGINT)
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
			defer stop()
			var idle time.Duration // the default: exit when idle
			if stay {
				idle = math.MaxInt64
			}
			err := fdstore.Serve(ctx, socket, idle)
			if errors.Is(err, fdstore.ErrHolderRunning) {
				return nil
			}
			return err
		},
	}
	cmd.Flags().StringVar(&socket, "socket", "", "unix socket the worker talks to")
	cmd.Flags().BoolVar(&stay, "stay", false, "keep running while idle (a Kubernetes sidecar), instead of exiting once nothing is held")
	return cmd
}
