// Temporary profiling driver (not a deliverable).
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/integration/harness"
)

func pidOf(pattern string) string {
	out, _ := exec.Command("pgrep", "-f", pattern).Output()
	return strings.Fields(string(out))[0]
}

func main() {
	archive, name, repo := os.Args[1], os.Args[2], "prof/app"
	env := harness.NewEnv()
	defer env.Close()
	if err := env.Run(func() {
		reg := harness.StartRegistry(env, harness.RegistryOptions{LogLevel: "warn"})
		d := harness.StartDockerd(env)
		d.Push(env, &harness.Image{Name: name, Archive: archive}, reg.Addr+"/"+repo+":v1")
		reg.WaitReady(env, repo, "v1")
		regPID := pidOf("starlight-registry serve " + reg.ConfigPath)
		for i := 0; i < 2; i++ {
			body, _ := json.Marshal(api.DeltaRequest{Reference: repo + ":v1"})
			var perf *exec.Cmd
			if i == 1 {
				perf = exec.Command("perf", "record", "-F", "499", "-g", "-o", "/tmp/perf-reg.data", "-p", regPID)
				perf.Start()
				time.Sleep(300 * time.Millisecond)
			}
			start := time.Now()
			resp, err := http.Post(reg.URL+"/starlight/delta", "application/json", bytes.NewReader(body))
			if err != nil {
				panic(err)
			}
			buf := make([]byte, 1)
			io.ReadFull(resp.Body, buf)
			first := time.Since(start)
			n, _ := io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			fmt.Printf("registry delta: status %d first byte %.3fs, all %d bytes %.3fs\n", resp.StatusCode, first.Seconds(), n+1, time.Since(start).Seconds())
			if perf != nil {
				perf.Process.Signal(os.Interrupt)
				perf.Wait()
			}
		}
		node := harness.StartNode(env, reg.URL)
		wpid := pidOf("starlight-worker --root " + node.Worker.Root)
		perf := exec.Command("perf", "record", "-F", "499", "-g", "-o", "/tmp/perf-wrk.data", "-p", wpid)
		perf.Start()
		strace := exec.Command("strace", "-c", "-f", "-o", "/tmp/strace-wrk.txt", "-p", wpid)
		if os.Getenv("STRACE") != "" {
			strace.Start()
		}
		time.Sleep(500 * time.Millisecond)
		start := time.Now()
		node.Worker.CLI(env, "prof", "pull", "--plain-http", "--wait", reg.Addr+"/"+repo+":v1")
		fmt.Printf("worker pull --wait: %.3fs\n", time.Since(start).Seconds())
		perf.Process.Signal(os.Interrupt)
		perf.Wait()
		if strace.Process != nil {
			strace.Process.Signal(os.Interrupt)
			strace.Wait()
		}
		imgs, _ := node.Worker.Images()
		for _, im := range imgs {
			fmt.Printf("worker image: started %s ready %v complete %v bytes %d\n", im.Started.Format("15:04:05.000"), im.Ready.Sub(im.Started), im.Completed.Sub(im.Started), im.BytesReceived)
		}
		fmt.Println(node.Worker.Log())
	}); err != nil {
		fmt.Println("ERR", err)
	}
}
