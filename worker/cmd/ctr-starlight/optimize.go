package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/starlight-project/starlight/worker/client"
)

var optimizeCmd = &cobra.Command{
	Use:   "optimize [on|off]",
	Short: "Trace every new container on Starlight images (on), or only those created with --optimize (off)",
	Long: `With "on", the worker records the startup trace of every new container whose
rootfs sits on Starlight layers, as "create --optimize" does for one container.
The mode survives worker restarts. Without an argument, prints the mode.`,
	Args:      cobra.MaximumNArgs(1),
	ValidArgs: []string{"on", "off"},
	RunE: func(cmd *cobra.Command, args []string) error {
		c := client.New(global.worker)
		defer c.Close()
		if len(args) == 1 {
			var on bool
			switch args[0] {
			case "on":
				on = true
			case "off":
			default:
				return fmt.Errorf("optimize: want on or off, got %q", args[0])
			}
			if err := c.SetOptimize(cmd.Context(), on); err != nil {
				return err
			}
		}
		on, err := c.Optimize(cmd.Context())
		if err != nil {
			return err
		}
		state := "off"
		if on {
			state = "on"
		}
		fmt.Fprintf(os.Stdout, "optimize: %s\n", state)
		return nil
	},
}

func init() {
	rootCmd.AddCommand(optimizeCmd)
}
