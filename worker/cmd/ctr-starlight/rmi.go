package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/starlight-project/starlight/worker/client"
)

var rmiCmd = &cobra.Command{
	Use:   "rmi REF",
	Short: "Remove an image from the worker and containerd, freeing what nothing else uses",
	Long: `Rmi removes the image from containerd and from the worker's records. Layers
no other image or container uses are dropped with their contents, except the
contents other layers share: removing an image never removes a file another
image still uses.`,
	Args: cobra.ExactArgs(1),
	RunE: func(cmd *cobra.Command, args []string) error {
		c := client.New(global.worker)
		defer c.Close()
		res, err := c.RemoveImage(cmd.Context(), args[0], global.namespace)
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stdout, "%s: removed (%d layers, %d contents, %s freed)\n", res.Ref, res.Layers, res.Contents, humanBytes(res.Bytes))
		return nil
	},
}

func init() {
	rootCmd.AddCommand(rmiCmd)
}
