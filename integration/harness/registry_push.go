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
	MediaTypeOCIIndex    = "application/vnd.oci.image.index.v1+json"
)

// Descriptor is an OCI content descriptor.
type Descriptor struct {
	MediaType string `json:"mediaType"`
	Digest    string `json:"digest"`
	Size      int64  `json:"size"`
	// Platform is set on the manifests of an index.
	Platform *Platform `json:"platform,omitempty"`
}

// Platform is an OCI platform, as in an index and an image config.
type Platform struct {
	OS           string `json:"os"`
	Architecture string `json:"architecture"`
	Variant      string `json:"variant,omitempty"`
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
	return r.PushLayersCmd(t, repo, tag, layers, diffIDs, []string{"/bin/sh"})
}

// PushLayersCmd is PushLayers with cmd as the image config's Cmd.
func (r *Registry) PushLayersCmd(t T, repo, tag string, layers []Descriptor, diffIDs, cmd []string) string {
	t.Helper()
	cfg := map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"config":       map[string]any{"Cmd": cmd},
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

// PushPlatformImage pushes an OCI image of platform made of layers (gzip
// blobs, see LayerBlob) to repo, its manifest by digest only, and returns
// the manifest's descriptor with its platform, for PushIndex. The image
// need not run on the host: a foreign platform's image can hold just
// files.
func (r *Registry) PushPlatformImage(t T, repo string, platform Platform, layers []Layer) Descriptor {
	t.Helper()
	var descs []Descriptor
	var diffIDs []string
	for i, l := range layers {
		blob, diffID, err := LayerBlob(l)
		if err != nil {
			t.Fatalf("layer %d of the %s/%s image: %v", i, platform.OS, platform.Architecture, err)
		}
		descs = append(descs, r.PushBlob(t, repo, blob, MediaTypeLayerGzip))
		diffIDs = append(diffIDs, diffID)
	}
	cfg := map[string]any{
		"architecture": platform.Architecture,
		"os":           platform.OS,
		"config":       map[string]any{"Cmd": []string{"/bin/sh"}},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": diffIDs},
	}
	if platform.Variant != "" {
		cfg["variant"] = platform.Variant
	}
	cfgJSON, _ := json.Marshal(cfg)
	m, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     MediaTypeOCIManifest,
		"config":        r.PushBlob(t, repo, cfgJSON, MediaTypeOCIConfig),
		"layers":        descs,
	})
	d := r.PushManifest(t, repo, Digest(m), m, MediaTypeOCIManifest)
	return Descriptor{MediaType: MediaTypeOCIManifest, Digest: d, Size: int64(len(m)), Platform: &platform}
}

// PushIndex pushes an OCI image index of manifests (pushed before, see
// PushPlatformImage) as repo:tag and returns its digest.
func (r *Registry) PushIndex(t T, repo, tag string, manifests []Descriptor) string {
	t.Helper()
	idx, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     MediaTypeOCIIndex,
		"manifests":     manifests,
	})
	return r.PushManifest(t, repo, tag, idx, MediaTypeOCIIndex)
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
