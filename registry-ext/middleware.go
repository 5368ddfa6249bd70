package registryext

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/distribution/distribution/v3"
	"github.com/distribution/distribution/v3/registry"
	"github.com/distribution/distribution/v3/registry/api/errcode"
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
// conversion is asynchronous. A push whose conversion cannot be queued
// fails (503, after retrying for a while): a push that succeeded is
// converted. The manifest stays stored; pushing again queues the job.
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
	return dgst, m.repo.enqueue(ctx, dgst, mediaType, tag, true)
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
		return t.repo.enqueue(ctx, desc.Digest, desc.MediaType, tag, false)
	}
	return nil
}

// enqueueRetryFor bounds how long a push retries queuing its conversion
// (the index busy, a PostgreSQL failover) before it fails.
var enqueueRetryFor = 20 * time.Second

// enqueue queues the conversion of a push, retrying with backoff for up
// to enqueueRetryFor, and returns a 503 error for the push if it could
// not.
func (r *repository) enqueue(ctx context.Context, dgst digest.Digest, mediaType, tag string, requeue bool) error {
	name := r.Named().Name()
	logger := log.G(ctx).WithFields(log.Fields{"repository": name, "digest": dgst, "tag": tag})
	deadline := time.Now().Add(enqueueRetryFor)
	delay := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		_, err := r.x.queuePush(ctx, name, dgst, mediaType, tag, requeue)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil || time.Now().Add(delay).After(deadline) {
			logger.WithError(err).WithField("attempts", attempt).Error("starlight: could not queue conversion; failing the push")
			return errcode.ErrorCodeUnavailable.WithMessage(
				fmt.Sprintf("the registry could not queue the conversion of this image (%v); push again", err))
		}
		logger.WithError(err).WithField("attempt", attempt).Warn("starlight: queuing conversion; retrying")
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
		delay = min(2*delay, 2*time.Second)
	}
}

// queuePush records a conversion job unless the push is the extension's
// own output: a converted tag, or a manifest a conversion wrote. It
// reports whether a job was queued.
func (x *Extension) queuePush(ctx context.Context, repo string, dgst digest.Digest, mediaType, tag string, requeue bool) (bool, error) {
	logger := log.G(ctx).WithFields(log.Fields{"repository": repo, "digest": dgst, "tag": tag})
	if tag != "" && strings.HasSuffix(tag, x.opts.TagSuffix) {
		logger.Debug("starlight: converted tag pushed; no conversion")
		return false, nil
	}
	out, err := x.db.IsConversionOutput(ctx, repo, dgst.String())
	if err != nil {
		return false, err
	}
	if out {
		logger.Debug("starlight: converted image pushed; no conversion")
		return false, nil
	}
	p := schema.Push{Repository: repo, Digest: dgst.String(), MediaType: mediaType, Tag: tag, Requeue: requeue}
	if tag == "" && !isIndexType(mediaType) {
		// Likely a platform manifest of an index about to be pushed: give
		// the index the chance to convert it first.
		p.Delay = x.opts.DigestDelay
	}
	queued, err := x.db.Enqueue(ctx, p)
	if err != nil {
		return false, err
	}
	if queued {
		logger.Info("starlight: conversion queued")
		x.notify()
	}
	return queued, nil
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
