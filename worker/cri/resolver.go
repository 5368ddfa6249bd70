// Package cri accelerates Kubernetes (CRI) pulls: containerd's CRI plugin
// unpacks an image into the starlight snapshotter layer by layer, naming
// each layer by its pushed (gzip) digest. Resolver wraps the layer
// registry so that the Prepare of a layer of an image the worker does not
// know yet fetches that image's bundle header first; the pushed digests
// then resolve to the converted layers that replace them.
package cri

import (
	"context"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/layers"
	"github.com/starlight-project/starlight/worker/snapshotter"
)

// Fetcher fetches the bundle header of the image a CRI pull is unpacking,
// so that its layers and their pushed digests become known. FetchCRI
// returns once they are recorded (the contents keep streaming in the
// background), or with the reason it cannot provide them.
type Fetcher interface {
	FetchCRI(ctx context.Context, imageRef string, manifest digest.Digest) error
}

// Resolver is the layer registry as the snapshotter sees it: every method
// is the registry's, except that Resolve fetches an unknown CRI image.
type Resolver struct {
	*layers.Registry
	fetch Fetcher
}

var (
	_ snapshotter.Layers        = (*Resolver)(nil)
	_ snapshotter.LayerUsager   = (*Resolver)(nil)
	_ snapshotter.LayerUnpinner = (*Resolver)(nil)
)

// NewResolver wraps l; fetch brings the images CRI pulls name.
func NewResolver(l *layers.Registry, fetch Fetcher) *Resolver {
	return &Resolver{Registry: l, fetch: fetch}
}

// Resolve implements snapshotter.Layers. A layer the registry knows (by its
// digest, or by the pushed digest a bundle header mapped to it) resolves at
// once. Otherwise, for a Prepare with CRI labels (cri.layer-digest,
// cri.image-ref, cri.manifest-digest), the image's header is fetched from
// its Starlight registry (the first layer of an image waits for it, the
// others find their mapping); when that fails, Resolve declines and
// containerd downloads and unpacks the layer itself.
func (r *Resolver) Resolve(ctx context.Context, labels map[string]string) (digest.Digest, bool) {
	if d, ok := r.Registry.Resolve(ctx, labels); ok {
		return d, true
	}
	v, ok := labels[snapshotter.LabelCRILayerDigest]
	if !ok {
		return "", false
	}
	d, err := api.ParseDigest(v)
	if err != nil {
		return "", false // logged by the registry
	}
	ref, manifest := labels[snapshotter.LabelCRIImageRef], labels[snapshotter.LabelCRIManifestDigest]
	logger := log.G(ctx).WithFields(log.Fields{"layer": d, "image": ref, "manifest": manifest})
	if ref == "" || manifest == "" {
		logger.Debug("CRI layer unknown, containerd unpacks it")
		return "", false
	}
	md, err := api.ParseDigest(manifest)
	if err != nil {
		logger.WithError(err).Info("invalid CRI manifest digest, containerd unpacks the layer")
		return "", false
	}
	if err := r.fetch.FetchCRI(ctx, ref, md); err != nil {
		logger.WithError(err).Info("Starlight cannot provide the layer, containerd downloads and unpacks it")
		return "", false
	}
	if c, ok := r.Registry.Resolve(ctx, labels); ok {
		logger.WithField("converted", c).Debug("CRI layer resolved")
		return c, true
	}
	logger.Info("the Starlight image does not name this pushed layer (registry without originalDigest?), containerd downloads and unpacks it")
	return "", false
}
