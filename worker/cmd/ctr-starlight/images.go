package main

import (
	"fmt"
	"io"
	"os"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/client"
)

var imagesCmd = &cobra.Command{
	Use:     "images",
	Aliases: []string{"image", "ls"},
	Short:   "List the images pulled through the worker and how much of them has arrived",
	Args:    cobra.NoArgs,
	RunE: func(cmd *cobra.Command, _ []string) error {
		c := client.New(global.worker)
		defer c.Close()
		imgs, err := c.Images(cmd.Context())
		if err != nil {
			return err
		}
		var shown []api.WorkerImage
		for _, img := range imgs {
			if global.namespace == "" || img.Namespace == global.namespace {
				shown = append(shown, img)
			}
		}
		return printImages(os.Stdout, shown)
	},
}

func init() {
	rootCmd.AddCommand(imagesCmd)
}

func printImages(out io.Writer, imgs []api.WorkerImage) error {
	tw := tabwriter.NewWriter(out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "REF\tDIGEST\tPLATFORM\tSIZE\tDEDUP\tSENT\tRECEIVED\tSTATE")
	for _, img := range imgs {
		dgst := img.Digest
		if len(dgst) > 19 {
			dgst = dgst[:19] // sha256: + 12 hex, like docker's short IDs
		}
		received := "-"
		if img.BytesTotal > 0 || img.State == api.PullReady || img.State == api.PullComplete {
			received = fmt.Sprintf("%s (%d%%)", humanBytes(img.BytesReceived), percent(img.BytesReceived, img.BytesTotal))
		}
		state := img.State
		if img.Error != "" {
			state += ": " + img.Error
		}
		// SIZE is the compressed size of every content of the image,
		// DEDUP what the registry left out because this worker held
		// it, SENT what the bundle carried (the registry's counters);
		// RECEIVED is how much of SENT has arrived.
		size := img.ImageBytes
		if size == 0 {
			size = img.BytesTotal
		}
		dedup, sent := "-", "-"
		if img.ImageBytes > 0 || img.SendBytes > 0 || img.DedupBytes > 0 {
			dedup, sent = humanBytes(img.DedupBytes), humanBytes(img.SendBytes)
		}
		platform := img.Platform
		if platform == "" {
			platform = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", img.Ref, dgst, platform, humanBytes(size), dedup, sent, received, state)
	}
	return tw.Flush()
}

func percent(n, total int64) int64 {
	if total <= 0 {
		return 100
	}
	return n * 100 / total
}
