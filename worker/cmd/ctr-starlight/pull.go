package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/client"
)

var pullOpts struct {
	plainHTTP bool
	wait      bool
	platform  string
	user      string
}

var pullCmd = &cobra.Command{
	Use:   "pull [--plain-http] [--wait] [--platform os/arch[/variant]] [--user user[:password]] REF",
	Short: "Pull an image through the worker: one delta bundle, usable before it has arrived",
	Long: `Pull asks the worker to pull REF from its Starlight registry. It returns as
soon as the image is usable (it exists in containerd and its snapshot chain is
committed in the "starlight" snapshotter) while contents keep streaming; with
--wait it returns once everything has arrived. The worker pulls the manifest of
its own platform from a multi-platform image unless --platform names another
(as "ctr pull --platform" does). Then:

  ctr run --snapshotter starlight REF ID`,
	Args: cobra.ExactArgs(1),
	RunE: func(cmd *cobra.Command, args []string) error {
		ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		req := api.PullRequest{
			Ref:       args[0],
			PlainHTTP: pullOpts.plainHTTP,
			Namespace: global.namespace,
			Wait:      pullOpts.wait,
			Platform:  pullOpts.platform,
		}
		if pullOpts.user != "" {
			user, password, err := parseUser(pullOpts.user)
			if err != nil {
				return err
			}
			req.User = user + ":" + password
		}
		return runPull(ctx, os.Stdout, term.IsTerminal(int(os.Stdout.Fd())), req)
	},
}

func init() {
	pullCmd.Flags().BoolVar(&pullOpts.plainHTTP, "plain-http", false, "talk HTTP, not HTTPS, to the registry for this pull")
	pullCmd.Flags().BoolVar(&pullOpts.wait, "wait", false, "return once every content has arrived, not when the image is usable")
	pullCmd.Flags().StringVar(&pullOpts.platform, "platform", "", `platform of a multi-platform image to pull, e.g. linux/arm64 (default: the worker's)`)
	pullCmd.Flags().StringVarP(&pullOpts.user, "user", "u", "", "registry credentials for this pull as user[:password], first for every host (default: the worker's sources)")
	rootCmd.AddCommand(pullCmd)
}

// runPull drives a pull. On a terminal it draws a progress bar (bytes,
// files, rate and time left); otherwise it prints one final line.
func runPull(ctx context.Context, out io.Writer, tty bool, req api.PullRequest) error {
	c := client.New(global.worker)
	defer c.Close()

	var (
		bar  *progressbar.ProgressBar
		last api.PullEvent
	)
	describe := func(ev api.PullEvent) string {
		return fmt.Sprintf("%-9s %d/%d files", ev.Status, ev.FilesReceived, ev.FilesTotal)
	}
	err := c.Pull(ctx, req, func(ev api.PullEvent) {
		if ev.Status == api.PullEventProgress {
			ev.Status = last.Status
		}
		last = ev
		if !tty || ev.Status == api.PullFailed {
			return
		}
		if bar == nil {
			if ev.Status == api.PullResolving {
				fmt.Fprintf(out, "%s: resolving\n", ev.Ref)
				return
			}
			bar = progressbar.NewOptions64(ev.BytesTotal,
				progressbar.OptionSetWriter(out),
				progressbar.OptionShowBytes(true),
				progressbar.OptionShowTotalBytes(true),
				progressbar.OptionSetPredictTime(true),
				progressbar.OptionSetElapsedTime(true),
				progressbar.OptionFullWidth(),
				progressbar.OptionSetRenderBlankState(true),
				progressbar.OptionSetDescription(describe(ev)),
			)
		}
		bar.ChangeMax64(max(ev.BytesTotal, 1))
		bar.Describe(describe(ev))
		bar.Set64(ev.BytesReceived)
	})
	if bar != nil {
		if last.Status == api.PullComplete {
			bar.Finish()
		}
		fmt.Fprintln(out)
	}
	if err != nil {
		return err
	}
	fmt.Fprintln(out, summary(last))
	return nil
}

func summary(ev api.PullEvent) string {
	if ev.Status == api.PullComplete {
		return fmt.Sprintf("%s: complete (%s in %d files received)", ev.Ref, humanBytes(ev.BytesTotal), ev.FilesTotal)
	}
	return fmt.Sprintf("%s: ready (%s of %s received, %d of %d files; the rest streams in the background)",
		ev.Ref, humanBytes(ev.BytesReceived), humanBytes(ev.BytesTotal), ev.FilesReceived, ev.FilesTotal)
}

func humanBytes(n int64) string {
	const unit = 1000
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %cB", float64(n)/float64(div), "kMGTPE"[exp])
}
