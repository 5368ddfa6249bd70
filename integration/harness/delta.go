package harness

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
)

// DeltaHeader posts req to the registry's POST /starlight/delta, as a
// worker would, and decodes only the bundle header (then drops the
// connection, so the frames are never sent in full). It returns the header
// and the bytes it takes on the wire (the 16-byte preamble and the
// compressed header). Tests use it to learn what the registry plans: the
// frame order, the contents and their compressed sizes.
func (r *Registry) DeltaHeader(req api.DeltaRequest) (*api.BundleHeader, int64, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, 0, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, r.URL+"/starlight/delta", bytes.NewReader(body))
	if err != nil {
		return nil, 0, err
	}
	hr.Header.Set("Content-Type", "application/json")
	if r.User != "" {
		hr.SetBasicAuth(r.User, r.Password)
	}
	// Not r.client: its timeout would cut a large header short.
	resp, err := http.DefaultClient.Do(hr)
	if err != nil {
		return nil, 0, fmt.Errorf("delta %s: %w", req.Reference, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, 0, fmt.Errorf("delta %s: %s: %s", req.Reference, resp.Status, bytes.TrimSpace(msg))
	}
	var pre [16]byte
	if _, err := io.ReadFull(resp.Body, pre[:]); err != nil {
		return nil, 0, fmt.Errorf("delta %s: preamble: %w", req.Reference, err)
	}
	size := int64(len(pre)) + int64(binary.BigEndian.Uint64(pre[8:]))
	br, err := bundle.NewReader(io.MultiReader(bytes.NewReader(pre[:]), resp.Body))
	if err != nil {
		return nil, 0, fmt.Errorf("delta %s: %w", req.Reference, err)
	}
	return br.Header(), size, nil
}
