package main

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/containerd"
	"github.com/spf13/cobra"

	"github.com/starlight-project/starlight/worker/client"
)

var createOpts struct {
	optimize    bool
	snapshotter string
}

var createCmd = &cobra.Command{
	Use:   "create [--optimize] [--snapshotter starlight] IMAGE CONTAINER_ID [-- ARGS...]",
	Short: "Create a container on a Starlight image, optionally tracing its startup",
	Long: `Create creates a container in containerd whose rootfs is a snapshot of IMAGE in
the starlight snapshotter. ARGS, if given, replace the image's command. With
--optimize the worker records the container's first access of every file
(startup trace), kept until "ctr-starlight report" sends it to the registry.
The containerd is the one -a (or CONTAINERD_ADDRESS) names, else the one the
worker imports its images into. Start the container with:

  ctr task start CONTAINER_ID

and remove it with "ctr container rm CONTAINER_ID" once it is done; its trace
is then complete.`,
	Args: cobra.MinimumNArgs(2),
	RunE: func(cmd *cobra.Command, args []string) error {
		if dash := cmd.ArgsLenAtDash(); dash >= 0 && dash != 2 {
			return fmt.Errorf("expected IMAGE CONTAINER_ID before --, got %d arguments", dash)
		}
		if cmd.ArgsLenAtDash() < 0 && len(args) > 2 {
			return fmt.Errorf("unexpected arguments %q: put the container's command after --", args[2:])
		}
		if createOpts.optimize {
			// Only an image the worker pulled can be traced: check
			// first rather than create a container that is not.
			wc := client.New(global.worker)
			_, err := wc.Image(cmd.Context(), args[0], global.namespace)
			wc.Close()
			if err != nil {
				return fmt.Errorf("--optimize: %w (only images pulled with ctr-starlight pull can be traced)", err)
			}
		}
		address, err := containerdAddress(cmd.Context())
		if err != nil {
			return err
		}
		c, err := containerd.New(address, containerd.WithDefaultNamespace(global.namespace))
		if err != nil {
			return fmt.Errorf("connecting to containerd at %s: %w (give its socket with -a or CONTAINERD_ADDRESS)", address, err)
		}
		defer c.Close()
		ctr, err := client.NewContainer(cmd.Context(), c, client.ContainerOptions{
			Ref: args[0], ID: args[1], Snapshotter: createOpts.snapshotter,
			Optimize: createOpts.optimize, Args: args[2:],
		})
		if err != nil {
			return err
		}
		what := "created"
		if createOpts.optimize {
			what = "created, traced"
		}
		fmt.Fprintf(os.Stdout, "%s: %s; start it with: ctr task start %s\n", ctr.ID(), what, ctr.ID())
		return nil
	},
}

// containerdAddress is the socket create dials: --address, whose default
// is $CONTAINERD_ADDRESS, else the containerd the worker imports its
// images into (GET /v1/info).
func containerdAddress(ctx context.Context) (string, error) {
	if global.address != "" {
		return global.address, nil
	}
	wc := client.New(global.worker)
	defer wc.Close()
	info, err := wc.Info(ctx)
	if err != nil {
		return "", fmt.Errorf("asking the worker (--worker %s) which containerd it uses: %w; give containerd's socket with -a or CONTAINERD_ADDRESS", global.worker, err)
	}
	if info.Containerd == "" {
		return "", fmt.Errorf("the worker (--worker %s) names no containerd; give containerd's socket with -a or CONTAINERD_ADDRESS", global.worker)
	}
	return info.Containerd, nil
}

func init() {
	createCmd.Flags().BoolVar(&createOpts.optimize, "optimize", false, "record the container's startup trace")
	createCmd.Flags().StringVar(&createOpts.snapshotter, "snapshotter", "starlight", "snapshotter of the container's rootfs")
	rootCmd.AddCommand(createCmd)
}
