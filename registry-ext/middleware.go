package registryext

import (
	"context"
	"encoding/json"
	"strings"

	"github.com/containerd/log"
	"github.com/distribution/distribution/v3"
	"github.com/distribution/distribution/v3/registry"
	registrymw "github.com/distribution/distribution/v3/registry/middleware/registry"
	repositorymw "github.com/distribution/distribution/v3/registry/middleware/repository"
	storagedriver "github.com/distribution/distribution/v3/registry/storage/driver"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/schema"
)

func init() {
	if err := registrymw.Register(Name, newRegistryMiddleware); err != nil {
		panic(err)
	}
	if err := repositorymw.Register(Name, newRepositoryMiddleware); err != nil {
		panic(err)
	}
	registry.RegisterHandler(Handler)
}

// newRegistryMiddleware captures the registry's Namespace for the
// conversion workers and the delta planner, and starts the Extension of
// the configured database. The Namespace itself is returned unchanged. The
// Extension lives as long as the registry app (ctx).
func newRegistryMiddleware(ctx context.Context, ns distribution.Namespace, _ storagedriver.StorageDriver, options map[string]any) (distribution.Namespace, error) {
	opts, err := ParseOptions(options)
	if err != nil {
		return nil, err
	}
	x, err := acquire(opts, ns, true)
	if err != nil {
		return nil, err
	}
	go func() {
		<-ctx.Done()
		x.release()
	}()
	return ns, nil
}

// newRepositoryMiddleware wraps the repository of one request so that
// manifest pushes queue conversions. It runs for every request, so it only
// looks the Extension up.
func newRepositoryMiddleware(_ context.Context, repo distribution.Repository, options map[string]any) (distribution.Repository, error) {
	opts, err := ParseOptions(options)
	if err != nil {
		return nil, err
	}
	if !opts.AutoConvert {
		return repo, nil
	}
	x := Lookup(opts.Database)
	if x == nil {
		// No registry middleware (yet): open the database so pushes are
		// still recorded; conversion starts once a Namespace is known.
		if x, err = acquire(opts, nil, false); err != nil {
			return nil, err
		}
	}
	return &repository{Repository: repo, x: x}, nil
}

// repository queues a conversion job for every manifest pushed to it.
type repository struct {
	distribution.Repository
	x *Extension
}

func (r *repository) Manifests(ctx context.Context, options ...distribution.ManifestServiceOption) (distribution.ManifestService, error) {
	ms, err := r.Repository.Manifests(ctx, options...)
	if err != nil {
		return nil, err
	}
	return &manifestService{ManifestService: ms, repo: r}, nil
}

func (r *repository) Tags(ctx context.Context) distribution.TagService {
	return &tagService{TagService: r.Repository.Tags(ctx), repo: r}
}

type manifestService struct {
	distribution.ManifestService
	repo *repository
}

// Put stores the manifest, then queues its conversion. Put runs before the
// tag link is written (by the same request), which is one reason the
// conversion is asynchronous. A failure to queue is logged, never fails
// the push: the pushed image is what matters to the user.
func (m *manifestService) Put(ctx context.Context, manifest distribution.Manifest, options ...distribution.ManifestServiceOption) (digest.Digest, error) {
	dgst, err := m.ManifestService.Put(ctx, manifest, options...)
	if err != nil {
		return dgst, err
	}
	tag := ""
	for _, o := range options {
		if t, ok := o.(distribution.WithTagOption); ok {
			tag = t.Tag
		}
	}
	mediaType, payload, err := manifest.Payload()
	if err != nil {
		return dgst, nil
	}
	if !convertible(mediaType, payload) {
		log.G(ctx).WithFields(log.Fields{"repository": m.repo.Named().Name(), "digest": dgst, "mediaType": mediaType}).
			Debug("starlight: not an image; no conversion")
		return dgst, nil
	}
	m.repo.enqueue(ctx, dgst, mediaType, tag, true)
	return dgst, nil
}

type tagService struct {
	distribution.TagService
	repo *repository
}

// Tag writes the tag, then makes sure a job exists for the tagged image,
// for callers that tag an existing manifest without pushing it. A job the
// manifest push of the same request queued is left as it is.
func (t *tagService) Tag(ctx context.Context, tag string, desc ocispec.Descriptor) error {
	if err := t.TagService.Tag(ctx, tag, desc); err != nil {
		return err
	}
	if isManifestType(desc.MediaType) || desc.MediaType == "" {
		t.repo.enqueue(ctx, desc.Digest, desc.MediaType, tag, false)
	}
	return nil
}

// enqueue records a conversion job unless the push is the extension's own
// output: a converted tag, or a manifest a conversion wrote.
func (r *repository) enqueue(ctx context.Context, dgst digest.Digest, mediaType, tag string, requeue bool) {
	name := r.Named().Name()
	logger := log.G(ctx).WithFields(log.Fields{"repository": name, "digest": dgst, "tag": tag})
	if tag != "" && strings.HasSuffix(tag, r.x.opts.TagSuffix) {
		logger.Debug("starlight: converted tag pushed; no conversion")
		return
	}
	out, err := r.x.db.IsConversionOutput(ctx, name, dgst.String())
	if err != nil {
		logger.WithError(err).Error("starlight: could not queue conversion")
		return
	}
	if out {
		logger.Debug("starlight: converted image pushed; no conversion")
		return
	}
	p := schema.Push{Repository: name, Digest: dgst.String(), MediaType: mediaType, Tag: tag, Requeue: requeue}
	if tag == "" && !isIndexType(mediaType) {
		// Likely a platform manifest of an index about to be pushed: give
		// the index the chance to convert it first.
		p.Delay = r.x.opts.DigestDelay
	}
	queued, err := r.x.db.Enqueue(ctx, p)
	if err != nil {
		logger.WithError(err).Error("starlight: could not queue conversion")
		return
	}
	if queued {
		logger.Info("starlight: conversion queued")
		r.x.notify()
	}
}

func isIndexType(mediaType string) bool {
	return mediaType == ocispec.MediaTypeImageIndex || mediaType == mediaTypeDockerManifestList
}

const (
	mediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	mediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	mediaTypeDockerConfig       = "application/vnd.docker.container.image.v1+json"
)

// convertible reports whether a pushed manifest is a container image (or
// an index of them) rather than an artifact (a signature, an SBOM, a Helm
// chart), which is stored but not converted.
func convertible(mediaType string, payload []byte) bool {
	switch mediaType {
	case ocispec.MediaTypeImageIndex, mediaTypeDockerManifestList:
		return true
	case ocispec.MediaTypeImageManifest, mediaTypeDockerManifest:
		var m struct {
			Config ocispec.Descriptor `json:"config"`
		}
		if err := json.Unmarshal(payload, &m); err != nil {
			return false
		}
		return m.Config.MediaType == ocispec.MediaTypeImageConfig || m.Config.MediaType == mediaTypeDockerConfig
	}
	return false
}
