// Package client is the Go client of the starlight-worker API, served over
// HTTP on the worker's unix socket (--api). The JSON of that API is
// defined in package api (api/worker.go), shared with the worker.
package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"

	"github.com/starlight-project/starlight/api"
)

// Client talks to a starlight-worker over its API socket.
type Client struct {
	hc *http.Client
}

// New returns a client of the worker API served on the unix socket path.
func New(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}
	return &Client{hc: &http.Client{Transport: tr}}
}

// The host part is ignored: every request goes to the socket.
const base = "http://starlight-worker"

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

// Pull asks the worker to pull req.Ref and calls fn with every event until
// the image is usable (or complete with req.Wait). A failed pull returns
// the worker's message verbatim as the error.
func (c *Client) Pull(ctx context.Context, req api.PullRequest, fn func(api.PullEvent)) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/pull", bytes.NewReader(body))
	if err != nil {
		return err
	}
	hr.Header.Set("Content-Type", "application/json")
	resp, err := c.do(hr)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	want := api.PullReady
	if req.Wait {
		want = api.PullComplete
	}
	for sc.Scan() {
		var ev api.PullEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("decoding worker event: %w", err)
		}
		if fn != nil {
			fn(ev)
		}
		switch ev.Status {
		case api.PullFailed:
			return errors.New(ev.Message)
		case want:
			return nil
		case api.PullComplete: // complete implies ready
			return nil
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("reading worker events: %w", err)
	}
	return errors.New("the worker ended the pull stream before the image was ready")
}

// Images lists the images pulled through the worker.
func (c *Client) Images(ctx context.Context) ([]api.WorkerImage, error) {
	var out []api.WorkerImage
	if err := c.get(ctx, "/v1/images", &out); err != nil {
		return nil, err
	}
	return out, nil
}

// Image returns the state of one image. namespace may be empty.
func (c *Client) Image(ctx context.Context, ref, namespace string) (*api.WorkerImage, error) {
	p := "/v1/images/" + url.PathEscape(ref)
	if namespace != "" {
		p += "?namespace=" + url.QueryEscape(namespace)
	}
	var out api.WorkerImage
	if err := c.get(ctx, p, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// RemoveImage removes the image ref from the worker and from containerd,
// then drops the layers and contents nothing else uses. namespace may be
// empty ("default").
func (c *Client) RemoveImage(ctx context.Context, ref, namespace string) (*api.RemoveResult, error) {
	p := "/v1/images/" + url.PathEscape(ref)
	if namespace != "" {
		p += "?namespace=" + url.QueryEscape(namespace)
	}
	var out api.RemoveResult
	if err := c.call(ctx, http.MethodDelete, p, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Optimize returns whether every new container is traced.
func (c *Client) Optimize(ctx context.Context) (bool, error) {
	var out api.OptimizeState
	err := c.get(ctx, "/v1/optimize", &out)
	return out.On, err
}

// SetOptimize turns tracing of every new container on or off.
func (c *Client) SetOptimize(ctx context.Context, on bool) error {
	return c.call(ctx, http.MethodPut, "/v1/optimize", api.OptimizeState{On: on}, &api.OptimizeState{})
}

// Traces lists the traces not yet reported.
func (c *Client) Traces(ctx context.Context) ([]api.TraceSummary, error) {
	var out []api.TraceSummary
	if err := c.get(ctx, "/v1/traces", &out); err != nil {
		return nil, err
	}
	return out, nil
}

// Report uploads every pending trace (see api.ReportRequest). A trace that
// fails is listed with its error; the call itself fails only when the
// worker cannot try.
func (c *Client) Report(ctx context.Context, req api.ReportRequest) (*api.ReportResult, error) {
	var out api.ReportResult
	if err := c.call(ctx, http.MethodPost, "/v1/traces/report", req, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Info returns the worker's version and what it is wired to (its
// containerd, root, snapshotter socket, default platform).
func (c *Client) Info(ctx context.Context) (*api.WorkerInfo, error) {
	var out api.WorkerInfo
	if err := c.get(ctx, "/v1/info", &out); err != nil {
		return nil, err
	}
	return &out, nil
}

func (c *Client) get(ctx context.Context, path string, v any) error {
	return c.call(ctx, http.MethodGet, path, nil, v)
}

// call sends in (if not nil) as JSON and decodes the answer into v.
func (c *Client) call(ctx context.Context, method, path string, in, v any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	hr, err := http.NewRequestWithContext(ctx, method, base+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		hr.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.do(hr)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(v); err != nil {
		return fmt.Errorf("decoding worker answer: %w", err)
	}
	return nil
}

// do sends a request and turns a non-2xx answer into its message.
func (c *Client) do(hr *http.Request) (*http.Response, error) {
	resp, err := c.hc.Do(hr)
	if err != nil {
		return nil, fmt.Errorf("contacting starlight-worker: %w", err)
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var eb api.Error
	if json.Unmarshal(b, &eb) == nil && eb.Message != "" {
		return nil, errors.New(eb.Message)
	}
	return nil, fmt.Errorf("starlight-worker: %s: %s", resp.Status, strings.TrimSpace(string(b)))
}
