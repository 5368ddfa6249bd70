package api

import (
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestWriteErrorReadError(t *testing.T) {
	for _, tc := range []struct {
		status int
		code   ErrorCode
		msg    string
	}{
		{http.StatusBadRequest, CodeBadRequest, `invalid reference "a b"`},
		{http.StatusUnauthorized, CodeUnauthorized, "authentication required"},
		{http.StatusNotFound, CodeNotFound, "tag app:v9 not found"},
		{http.StatusConflict, CodeNotReady, "image app@sha256:… is converting"},
		{http.StatusInternalServerError, CodeInternal, "internal error; see the registry log"},
		{http.StatusServiceUnavailable, CodeUnavailable, "<script>alert(1)</script>"},
	} {
		t.Run(string(tc.code), func(t *testing.T) {
			rec := httptest.NewRecorder()
			WriteError(rec, tc.status, tc.code, tc.msg)
			resp := rec.Result()
			if resp.StatusCode != tc.status {
				t.Errorf("status %d, want %d", resp.StatusCode, tc.status)
			}
			for k, want := range map[string]string{"Content-Type": "application/json", "X-Content-Type-Options": "nosniff"} {
				if got := resp.Header.Get(k); got != want {
					t.Errorf("%s %q, want %q", k, got, want)
				}
			}
			if body := rec.Body.String(); !strings.HasSuffix(body, "}\n") || !strings.HasPrefix(body, `{"code":"`+string(tc.code)+`","message":`) {
				t.Errorf("body %q", body)
			}
			e := ReadError(resp)
			if e.Code != tc.code || e.Message != tc.msg {
				t.Errorf("read back %+v", e)
			}
		})
	}
}

func TestReadError(t *testing.T) {
	huge := `{"code":"NOT_FOUND","message":"` + strings.Repeat("x", 2*MaxErrorSize) + `"}`
	for _, tc := range []struct {
		name   string
		status int
		body   string
		want   Error
	}{
		{"starlight", 409, `{"code":"NOT_READY","message":"image is queued"}`, Error{CodeNotReady, "image is queued"}},
		{"message only", 404, `{"message":"no such image"}`, Error{"", "no such image"}},
		{"distribution", 403, `{"errors":[{"code":"DENIED","message":"requested access to the resource is denied","detail":null},{"code":"X"}]}`,
			Error{"DENIED", "requested access to the resource is denied"}},
		{"plain text", 404, "404 page not found\n", Error{"", "Not Found"}},
		{"html", 502, "<html><body>Bad Gateway</body></html>", Error{"", "Bad Gateway"}},
		{"empty", 500, "", Error{"", "Internal Server Error"}},
		{"empty object", 503, "{}", Error{"", "Service Unavailable"}},
		{"no errors", 400, `{"errors":[]}`, Error{"", "Bad Request"}},
		{"unknown status", 599, "", Error{"", "HTTP status 599"}},
		{"huge body truncated", 404, huge, Error{"", "Not Found"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := &countingReader{r: strings.NewReader(tc.body)}
			resp := &http.Response{StatusCode: tc.status, Body: io.NopCloser(body)}
			if got := ReadError(resp); *got != tc.want {
				t.Errorf("got %+v, want %+v", *got, tc.want)
			}
			if body.n > MaxErrorSize {
				t.Errorf("read %d bytes of the body, at most %d allowed", body.n, MaxErrorSize)
			}
		})
	}
}

func TestErrorString(t *testing.T) {
	if s := (&Error{CodeNotFound, "tag app:v9 not found"}).Error(); s != "NOT_FOUND: tag app:v9 not found" {
		t.Errorf("%q", s)
	}
	if s := (&Error{Message: "Bad Gateway"}).Error(); s != "Bad Gateway" {
		t.Errorf("%q", s)
	}
}

func TestWriteJSONUnencodable(t *testing.T) {
	rec := httptest.NewRecorder()
	WriteJSON(rec, http.StatusOK, map[string]float64{"x": math.Inf(1)})
	if rec.Code != http.StatusInternalServerError {
		t.Errorf("status %d, want 500", rec.Code)
	}
	if e := ReadError(rec.Result()); e.Code != CodeInternal {
		t.Errorf("body %q", rec.Body.String())
	}
}

type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}
