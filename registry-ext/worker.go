package registryext

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/distribution/distribution/v3"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/convert"
	"github.com/starlight-project/starlight/schema"
)

// worker runs jobs until the Extension closes.
func (x *Extension) worker(id int) {
	defer x.wg.Done()
	for x.ctx.Err() == nil {
		job, err := x.db.LeaseJob(x.ctx, x.owner, x.opts.Lease)
		if err == nil {
			x.runJob(job)
			continue
		}
		if !errors.Is(err, schema.ErrNotFound) && x.ctx.Err() == nil {
			log.G(x.ctx).WithError(err).WithField("worker", id).Error("starlight: leasing a conversion job")
		}
		t := time.NewTimer(x.poll)
		select {
		case <-x.ctx.Done():
		case <-x.wake:
		case <-t.C:
		}
		t.Stop()
	}
}

// runJob runs one leased job and records its outcome.
func (x *Extension) runJob(job *schema.Job) {
	ctx, cancel := context.WithCancel(x.ctx)
	defer cancel()
	logger := log.G(ctx).WithFields(log.Fields{
		"repository": job.Repository,
		"digest":     job.Digest,
		"tag":        job.Tag,
		"attempt":    job.Attempts,
	})
	ctx = log.WithLogger(ctx, logger)

	// Renew the lease while the job runs; if another process took it over
	// (this one stalled past the lease), stop working on it.
	var leaseLost bool
	renewDone := make(chan struct{})
	go func() {
		defer close(renewDone)
		t := time.NewTicker(x.opts.Lease / 3)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if err := x.db.RenewLease(ctx, job, x.opts.Lease); err != nil {
					if errors.Is(err, schema.ErrLeaseLost) {
						logger.Warn("starlight: conversion lease lost to another process; abandoning")
						leaseLost = true
						cancel()
						return
					}
					logger.WithError(err).Warn("starlight: renewing conversion lease")
				}
			}
		}
	}()

	start := time.Now()
	logger.Info("starlight: conversion job started")
	converted, err := x.processRecovered(ctx, job)
	cancel()
	<-renewDone

	// The job's ctx is gone: record the outcome with a fresh, bounded one.
	rctx, rcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer rcancel()
	switch {
	case leaseLost:
		return
	case err != nil && x.ctx.Err() != nil:
		// Shutting down: give the job back without charging the attempt.
		if rerr := x.db.ReleaseJob(rctx, job); rerr != nil {
			logger.WithError(rerr).Warn("starlight: releasing job at shutdown")
		}
		if serr := x.db.SetImageState(rctx, job.Repository, job.Digest, api.StateQueued, "", job.Attempts-1); serr != nil {
			logger.WithError(serr).Warn("starlight: resetting image state at shutdown")
		}
		logger.Info("starlight: conversion interrupted by shutdown; job queued again")
	case err != nil:
		conversionsFailed.Inc()
		// An invalid image fails for good at once; other errors (storage,
		// a transient fault) are retried with backoff.
		maxAttempts := x.opts.MaxAttempts
		if errors.Is(err, convert.ErrInvalid) || errors.Is(err, errPanicked) {
			maxAttempts = job.Attempts
		}
		final, ferr := x.db.FailJob(rctx, job, err.Error(), maxAttempts, x.opts.RetryDelay)
		if ferr != nil {
			logger.WithError(ferr).Error("starlight: recording failed job")
			return
		}
		state := api.StateQueued
		if final {
			state = api.StateFailed
		}
		if serr := x.db.SetImageState(rctx, job.Repository, job.Digest, state, err.Error(), job.Attempts); serr != nil {
			logger.WithError(serr).Error("starlight: recording failed image")
		}
		logger.WithError(err).WithFields(log.Fields{"final": final, "maxattempts": x.opts.MaxAttempts}).
			Error("starlight: conversion failed")
	default:
		if cerr := x.db.CompleteJob(rctx, job); cerr != nil {
			logger.WithError(cerr).Error("starlight: completing job")
			return
		}
		if converted {
			conversionsTotal.Inc()
			conversionSeconds.Observe(time.Since(start).Seconds())
		}
		logger.WithFields(log.Fields{"converted": converted, "seconds": time.Since(start).Seconds()}).
			Info("starlight: conversion job done")
	}
	x.updateQueueDepth()
}

// errPanicked is matched by the error of a job whose conversion panicked:
// a bug, met again by every attempt (the input is the same), so the job
// fails at once instead of taking the registry down with it.
var errPanicked = errors.New("conversion panicked")

// processRecovered is process, with a panic turned into the job's error.
func (x *Extension) processRecovered(ctx context.Context, job *schema.Job) (converted bool, err error) {
	defer func() {
		if r := recover(); r != nil {
			log.G(ctx).WithField("stack", string(debug.Stack())).Error("starlight: conversion panicked")
			err = fmt.Errorf("%w: %v", errPanicked, r)
		}
	}()
	return x.process(ctx, job)
}

// process does the work of a job: convert and index the image unless that
// was done already, then write the converted tag. converted reports
// whether a conversion ran.
func (x *Extension) process(ctx context.Context, job *schema.Job) (converted bool, err error) {
	if job.Attempts > x.opts.MaxAttempts {
		// Retaken after expired leases too often: the conversion keeps
		// killing or stalling its registry.
		return false, fmt.Errorf("gave up after %d attempts that did not finish", job.Attempts-1)
	}
	ns := x.namespace()
	named, err := reference.WithName(job.Repository)
	if err != nil {
		return false, fmt.Errorf("repository %q: %w", job.Repository, err)
	}
	repo, err := ns.Repository(ctx, named)
	if err != nil {
		return false, fmt.Errorf("repository %s: %w", job.Repository, err)
	}
	dgst, err := digest.Parse(job.Digest)
	if err != nil {
		return false, fmt.Errorf("job digest: %w", err)
	}
	im, err := x.db.Image(ctx, job.Repository, job.Digest)
	if err != nil {
		return false, err
	}
	if im.State == api.StateReady && im.ConvertedDigest != "" {
		return false, x.tag(ctx, repo, job, digest.Digest(im.ConvertedDigest))
	}
	res, err := x.convert(ctx, repo, dgst, job)
	if err != nil {
		return false, err
	}
	// Tag before the image is reported ready, so a client that saw
	// "ready" can pull the converted tag.
	if err := x.tag(ctx, repo, job, digest.Digest(res.convertedDigest)); err != nil {
		return false, err
	}
	if err := x.db.CompleteImage(ctx, job.Repository, job.Digest, res.convertedDigest, res.convertedMediaType, res.manifests); err != nil {
		return false, err
	}
	// A trace needs a ready image; the prediction was computed before
	// (convert), so only its storage follows "ready".
	x.storePredictions(ctx, res.predictions)
	return res.converted, nil
}

// tag writes the converted tag of a job pushed by tag. The converted root
// is a manifest of the repository: written by the conversion, or the
// pushed image itself when it already was eStargz.
func (x *Extension) tag(ctx context.Context, repo distribution.Repository, job *schema.Job, converted digest.Digest) error {
	if job.Tag == "" {
		return nil
	}
	desc, err := manifestDescriptor(ctx, repo, converted)
	if err != nil {
		return fmt.Errorf("converted image: %w", err)
	}
	tag := job.Tag + x.opts.TagSuffix
	if err := repo.Tags(ctx).Tag(ctx, tag, desc); err != nil {
		return fmt.Errorf("tagging %s: %w", tag, err)
	}
	log.G(ctx).WithFields(log.Fields{"convertedTag": tag, "convertedDigest": desc.Digest}).
		Info("starlight: converted tag written")
	return nil
}

// conversion is the outcome of convert, recorded once the converted tag
// is written.
type conversion struct {
	convertedDigest    string
	convertedMediaType string
	manifests          []schema.ImageManifest
	converted          bool // a conversion ran (not reused from an index)
	// predictions are the startup predictions of the converted platform
	// manifests, stored once the image is ready.
	predictions []*api.TraceReport
}

// convert converts and indexes the pushed image dgst of repo. A platform
// manifest pushed by digest that was converted already as part of an
// index reuses that conversion.
func (x *Extension) convert(ctx context.Context, repo distribution.Repository, dgst digest.Digest, job *schema.Job) (*conversion, error) {
	src, err := manifestDescriptor(ctx, repo, dgst)
	if err != nil {
		return nil, fmt.Errorf("pushed image: %w", err)
	}
	if imgDigest, m, err := x.db.FindImageManifest(ctx, job.Repository, job.Digest); err == nil &&
		m.OriginalDigest == job.Digest && imgDigest != job.Digest {
		if conv, err := manifestDescriptor(ctx, repo, digest.Digest(m.ManifestDigest)); err == nil {
			log.G(ctx).WithField("index", imgDigest).Info("starlight: manifest already converted with its index")
			return &conversion{convertedDigest: m.ManifestDigest, convertedMediaType: conv.MediaType,
				manifests: []schema.ImageManifest{*m}}, nil
		}
	}

	if err := x.db.SetImageState(ctx, job.Repository, job.Digest, api.StateConverting, "", job.Attempts); err != nil {
		return nil, err
	}
	store := &repoStore{repo: repo}
	res, err := convert.ConvertImage(ctx, store, src, convert.Options{
		ChunkSize:           x.opts.ChunkSize,
		TempDir:             x.tmp.Path(),
		MaxUncompressedSize: x.opts.MaxUncompressed,
		MaxEntries:          x.opts.MaxFiles,
	})
	if err != nil {
		return nil, err
	}
	out := &conversion{
		convertedDigest:    res.Desc.Digest.String(),
		convertedMediaType: res.Desc.MediaType,
		manifests:          make([]schema.ImageManifest, 0, len(res.Manifests)),
		converted:          true,
	}
	for _, mr := range res.Manifests {
		im := schema.ImageManifest{
			Platform:       platformString(mr.Platform),
			OriginalDigest: mr.Original.Digest.String(),
			ManifestDigest: mr.Desc.Digest.String(),
			ConfigDigest:   mr.Config.Digest.String(),
		}
		for i, lr := range mr.Layers {
			if err := x.indexLayer(ctx, &lr); err != nil {
				return nil, fmt.Errorf("platform %s layer %d: %w", im.Platform, i, err)
			}
			im.Layers = append(im.Layers, lr.Desc.Digest.String())
		}
		out.manifests = append(out.manifests, im)
	}
	out.predictions = x.predictImage(ctx, store, job.Repository, res)
	x.conversions.Add(1)
	return out, nil
}

// indexLayer stores a converted layer's file tree. The entries may come
// from the TOC of a pushed eStargz layer, so they are validated like any
// untrusted input.
func (x *Extension) indexLayer(ctx context.Context, lr *convert.LayerResult) error {
	if lr.Index == nil {
		return fmt.Errorf("layer %s: conversion returned no index", lr.Desc.Digest)
	}
	if ok, err := x.db.LayerExists(ctx, lr.Desc.Digest.String()); err != nil || ok {
		return err
	}
	for i := range lr.Index.Entries {
		if err := lr.Index.Entries[i].Validate(); err != nil {
			return fmt.Errorf("layer %s: invalid entry: %w", lr.Desc.Digest, err)
		}
	}
	return x.db.PutLayer(ctx, &schema.Layer{
		Digest:           lr.Desc.Digest.String(),
		DiffID:           lr.DiffID.String(),
		Size:             lr.Desc.Size,
		TOCDigest:        lr.Index.TOCDigest.String(),
		UncompressedSize: lr.Index.UncompressedSize,
		Entries:          lr.Index.Entries,
	})
}

func platformString(p ocispec.Platform) string {
	return api.Platform{OS: p.OS, Architecture: p.Architecture, Variant: p.Variant}.String()
}

// sweeper runs sweep at start and every SweepInterval until the Extension
// closes.
func (x *Extension) sweeper() {
	defer x.wg.Done()
	skip := map[string]bool{} // repository@digest of tagged artifacts
	t := time.NewTicker(x.opts.SweepInterval)
	defer t.Stop()
	for {
		queued, err := x.sweep(x.ctx, skip)
		switch {
		case x.ctx.Err() != nil:
			return
		case err != nil:
			log.G(x.ctx).WithError(err).Warn("starlight: sweeping tags for missing conversion jobs")
		case queued > 0:
			log.G(x.ctx).WithField("queued", queued).Warn("starlight: sweep queued conversions of tags that had none")
		}
		select {
		case <-x.ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sweep queues a conversion for every tag of the registry whose image has
// no job for that tag: a push whose job was lost (the registry died
// between storing the manifest and queuing its job, or a registry without
// the extension wrote the storage). Converted tags, conversion outputs and
// tagged artifacts (not container images; remembered in skip) are left
// alone. It returns the number of jobs queued.
func (x *Extension) sweep(ctx context.Context, skip map[string]bool) (int, error) {
	ns := x.namespace()
	en, ok := ns.(distribution.RepositoryEnumerator)
	if !ok {
		return 0, nil
	}
	queued := 0
	err := en.Enumerate(ctx, func(name string) error {
		named, err := reference.WithName(name)
		if err != nil {
			return nil // not a repository distribution can serve
		}
		repo, err := ns.Repository(ctx, named)
		if err != nil {
			return fmt.Errorf("repository %s: %w", name, err)
		}
		tags, err := repo.Tags(ctx).All(ctx)
		if err != nil {
			var unknown distribution.ErrRepositoryUnknown
			if errors.As(err, &unknown) {
				return nil // no tags
			}
			return fmt.Errorf("tags of %s: %w", name, err)
		}
		for _, tag := range tags {
			if strings.HasSuffix(tag, x.opts.TagSuffix) {
				continue
			}
			desc, err := repo.Tags(ctx).Get(ctx, tag)
			if err != nil {
				continue // removed meanwhile
			}
			if skip[name+"@"+desc.Digest.String()] {
				continue
			}
			if _, err := x.db.Job(ctx, name, desc.Digest.String(), tag); err == nil {
				continue
			} else if !errors.Is(err, schema.ErrNotFound) {
				return err
			}
			mediaType, ok, err := convertibleManifest(ctx, repo, desc.Digest)
			if err != nil {
				log.G(ctx).WithError(err).WithFields(log.Fields{"repository": name, "tag": tag}).Warn("starlight: sweep")
				continue
			}
			if !ok {
				skip[name+"@"+desc.Digest.String()] = true
				continue
			}
			q, err := x.queuePush(ctx, name, desc.Digest, mediaType, tag, false)
			if err != nil {
				return err
			}
			if q {
				queued++
				log.G(ctx).WithFields(log.Fields{"repository": name, "tag": tag, "digest": desc.Digest}).
					Warn("starlight: tag had no conversion job; queued one")
			}
		}
		return ctx.Err()
	})
	return queued, err
}

// convertibleManifest reports whether a stored manifest is a container
// image (or an index), and its media type.
func convertibleManifest(ctx context.Context, repo distribution.Repository, dgst digest.Digest) (string, bool, error) {
	ms, err := repo.Manifests(ctx)
	if err != nil {
		return "", false, err
	}
	m, err := ms.Get(ctx, dgst)
	if err != nil {
		return "", false, fmt.Errorf("manifest %s: %w", dgst, err)
	}
	mediaType, payload, err := m.Payload()
	if err != nil {
		return "", false, fmt.Errorf("manifest %s: %w", dgst, err)
	}
	return mediaType, convertible(mediaType, payload), nil
}
