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

var reportOpts struct {
	server string
}

var reportCmd = &cobra.Command{
	Use:   "report [--server URL]",
	Short: "Upload the recorded startup traces to the registry",
	Long: `Report uploads every trace the worker holds to the registry of its image
(POST /starlight/v1/traces, with the worker's credentials for that registry),
or to --server. Running traced containers stop recording: their trace so far
is their startup trace. A trace the registry accepted is deleted; one that
failed stays for the next report.`,
	Args: cobra.NoArgs,
	RunE: func(cmd *cobra.Command, _ []string) error {
		c := client.New(global.worker)
		defer c.Close()
		res, err := c.Report(cmd.Context(), api.ReportRequest{Server: reportOpts.server})
		if err != nil {
			return err
		}
		return printReport(os.Stdout, res)
	},
}

var tracesCmd = &cobra.Command{
	Use:   "traces",
	Short: "List the startup traces not yet reported",
	Args:  cobra.NoArgs,
	RunE: func(cmd *cobra.Command, _ []string) error {
		c := client.New(global.worker)
		defer c.Close()
		traces, err := c.Traces(cmd.Context())
		if err != nil {
			return err
		}
		return printTraces(os.Stdout, traces)
	},
}

func init() {
	reportCmd.Flags().StringVar(&reportOpts.server, "server", "", "registry URL to send every trace to (http://host:port), instead of each image's registry")
	rootCmd.AddCommand(reportCmd, tracesCmd)
}

// printReport prints one line per trace and fails if any trace failed.
func printReport(out io.Writer, res *api.ReportResult) error {
	if len(res.Traces) == 0 {
		fmt.Fprintln(out, "no trace to report")
		return nil
	}
	failed := 0
	for _, t := range res.Traces {
		if t.Error != "" {
			failed++
			fmt.Fprintf(out, "%s: %s (%s): failed: %s\n", t.ID, t.Ref, t.Container, t.Error)
			continue
		}
		note := ""
		if t.Existing {
			note = ", already there"
		}
		fmt.Fprintf(out, "%s: %s (%s): %d accesses of %d files sent to %s%s\n",
			t.ID, t.Ref, t.Container, t.Accesses, t.Files, t.URL, note)
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d traces not reported; they are kept for the next report", failed, len(res.Traces))
	}
	return nil
}

func printTraces(out io.Writer, traces []api.TraceSummary) error {
	if len(traces) == 0 {
		fmt.Fprintln(out, "no trace pending")
		return nil
	}
	tw := tabwriter.NewWriter(out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tCONTAINER\tIMAGE\tFILES\tACCESSES\tSTATE")
	for _, t := range traces {
		state := "complete"
		switch {
		case t.Recording:
			state = "recording"
		case t.Partial:
			state = "partial"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\n", t.ID, t.Container, t.Ref, t.Files, t.Accesses, state)
	}
	return tw.Flush()
}
