package harness

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
)

// Media types used by the HTTP push helpers.
const (
	MediaTypeOCIManifest = "application/vnd.oci.image.manifest.v1+json"
	MediaTypeOCIConfig   = "application/vnd.oci.image.config.v1+json"
	MediaTypeLayerGzip   = "application/vnd.oci.image.layer.v1.tar+gzip"
	MediaTypeLayerTar    = "application/vnd.oci.image.layer.v1.tar"
)

// Descriptor is an OCI content descriptor.
type Descriptor struct {
	MediaType string `json:"mediaType"`
	Digest    string `json:"digest"`
	Size      int64  `json:"size"`
}

// Digest returns "sha256:<hex>" of b.
func Digest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// PushBlob uploads data to repo through the registry HTTP API (monolithic
// upload, Content-Type application/octet-stream) and returns its descriptor.
func (r *Registry) PushBlob(t T, repo string, data []byte, mediaType string) Descriptor {
	t.Helper()
	d := Descriptor{MediaType: mediaType, Digest: Digest(data), Size: int64(len(data))}
	req, _ := http.NewRequest(http.MethodPost, r.URL+"/v2/"+repo+"/blobs/uploads/", nil)
	resp, body, err := r.Do(req, true)
	if err != nil {
		t.Fatalf("start upload to %s: %v", repo, err)
	}
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("start upload to %s: %s: %s", repo, resp.Status, body)
	}
	loc, err := resp.Location()
	if err != nil {
		t.Fatalf("upload location: %v", err)
	}
	q := loc.Query()
	q.Set("digest", d.Digest)
	loc.RawQuery = q.Encode()
	req, _ = http.NewRequest(http.MethodPut, loc.String(), bytes.NewReader(data))
	req.Header.Set("Content-Type", "application/octet-stream")
	req.ContentLength = int64(len(data))
	resp, body, err = r.Do(req, true)
	if err != nil {
		t.Fatalf("upload blob to %s: %v", repo, err)
	}
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("upload blob to %s: %s: %s", repo, resp.Status, body)
	}
	return d
}

// PushManifest puts manifest under repo:ref and returns its digest.
func (r *Registry) PushManifest(t T, repo, ref string, manifest []byte, mediaType string) string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPut, r.URL+"/v2/"+repo+"/manifests/"+url.PathEscape(ref), bytes.NewReader(manifest))
	req.Header.Set("Content-Type", mediaType)
	resp, body, err := r.Do(req, true)
	if err != nil {
		t.Fatalf("put manifest %s:%s: %v", repo, ref, err)
	}
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("put manifest %s:%s: %s: %s", repo, ref, resp.Status, body)
	}
	return Digest(manifest)
}

// PushLayers pushes an OCI image made of the given layer blobs (with their
// media types and uncompressed digests) to repo:tag over HTTP and returns
// the manifest digest. The config is minimal but valid.
func (r *Registry) PushLayers(t T, repo, tag string, layers []Descriptor, diffIDs []string) string {
	t.Helper()
	cfg := map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"config":       map[string]any{"Cmd": []string{"/bin/sh"}},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": diffIDs},
	}
	cfgJSON, _ := json.Marshal(cfg)
	cfgDesc := r.PushBlob(t, repo, cfgJSON, MediaTypeOCIConfig)
	m := map[string]any{
		"schemaVersion": 2,
		"mediaType":     MediaTypeOCIManifest,
		"config":        cfgDesc,
		"layers":        layers,
	}
	mJSON, _ := json.Marshal(m)
	return r.PushManifest(t, repo, tag, mJSON, MediaTypeOCIManifest)
}

// ManifestDigest returns the digest the registry serves for repo:ref.
func (r *Registry) ManifestDigest(repo, ref string) (string, error) {
	req, _ := http.NewRequest(http.MethodHead, r.URL+"/v2/"+repo+"/manifests/"+ref, nil)
	req.Header.Set("Accept", fmt.Sprintf("%s, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json", MediaTypeOCIManifest))
	resp, _, err := r.Do(req, true)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("HEAD manifest %s:%s: %s", repo, ref, resp.Status)
	}
	return resp.Header.Get("Docker-Content-Digest"), nil
}
