package registryext

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"

	"github.com/distribution/distribution/v3"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/convert"
)

// isManifestType reports whether mediaType is stored by distribution as a
// manifest (through the manifest service) rather than as a blob.
func isManifestType(mediaType string) bool {
	for _, mt := range distribution.ManifestMediaTypes() {
		if mt == mediaType {
			return true
		}
	}
	return false
}

// repoStore is the convert.Store of one repository of the registry's own
// storage. It is built on the Namespace captured by the registry
// middleware, so what it writes does not pass through the repository
// middleware and queues no conversion.
type repoStore struct {
	repo distribution.Repository
}

var _ convert.Store = (*repoStore)(nil)

func (s *repoStore) Fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	if isManifestType(desc.MediaType) {
		ms, err := s.repo.Manifests(ctx)
		if err != nil {
			return nil, err
		}
		m, err := ms.Get(ctx, desc.Digest)
		if err != nil {
			return nil, fmt.Errorf("fetch manifest %s: %w", desc.Digest, err)
		}
		_, payload, err := m.Payload()
		if err != nil {
			return nil, fmt.Errorf("fetch manifest %s: %w", desc.Digest, err)
		}
		return io.NopCloser(bytes.NewReader(payload)), nil
	}
	rc, err := s.repo.Blobs(ctx).Open(ctx, desc.Digest)
	if err != nil {
		return nil, fmt.Errorf("fetch blob %s: %w", desc.Digest, err)
	}
	return rc, nil
}

func (s *repoStore) Push(ctx context.Context, desc ocispec.Descriptor, r io.Reader) error {
	if isManifestType(desc.MediaType) {
		return s.pushManifest(ctx, desc, r)
	}
	blobs := s.repo.Blobs(ctx)
	if _, err := blobs.Stat(ctx, desc.Digest); err == nil {
		return nil // already linked in this repository
	} else if !errors.Is(err, distribution.ErrBlobUnknown) {
		return fmt.Errorf("push blob %s: %w", desc.Digest, err)
	}
	bw, err := blobs.Create(ctx)
	if err != nil {
		return fmt.Errorf("push blob %s: %w", desc.Digest, err)
	}
	if _, err := io.Copy(bw, r); err != nil {
		bw.Cancel(ctx) //nolint:errcheck // the copy error matters
		return fmt.Errorf("push blob %s: %w", desc.Digest, err)
	}
	// Commit verifies the digest and size against what was written.
	if _, err := bw.Commit(ctx, ocispec.Descriptor{MediaType: desc.MediaType, Digest: desc.Digest, Size: desc.Size}); err != nil {
		bw.Cancel(ctx) //nolint:errcheck // the commit error matters
		return fmt.Errorf("push blob %s: %w", desc.Digest, err)
	}
	return nil
}

func (s *repoStore) pushManifest(ctx context.Context, desc ocispec.Descriptor, r io.Reader) error {
	payload, err := io.ReadAll(io.LimitReader(r, api.MaxManifestSize+1))
	if err != nil {
		return fmt.Errorf("push manifest %s: %w", desc.Digest, err)
	}
	if len(payload) > api.MaxManifestSize {
		return fmt.Errorf("push manifest %s: larger than %d bytes", desc.Digest, api.MaxManifestSize)
	}
	if got := digest.FromBytes(payload); got != desc.Digest {
		return fmt.Errorf("push manifest %s: content has digest %s", desc.Digest, got)
	}
	m, _, err := distribution.UnmarshalManifest(desc.MediaType, payload)
	if err != nil {
		return fmt.Errorf("push manifest %s: %w", desc.Digest, err)
	}
	ms, err := s.repo.Manifests(ctx)
	if err != nil {
		return err
	}
	got, err := ms.Put(ctx, m)
	if err != nil {
		return fmt.Errorf("push manifest %s: %w", desc.Digest, err)
	}
	if got != desc.Digest {
		return fmt.Errorf("push manifest %s: stored as %s", desc.Digest, got)
	}
	return nil
}

// manifestDescriptor returns the descriptor of a stored manifest.
func manifestDescriptor(ctx context.Context, repo distribution.Repository, dgst digest.Digest) (ocispec.Descriptor, error) {
	ms, err := repo.Manifests(ctx)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	m, err := ms.Get(ctx, dgst)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("get manifest %s: %w", dgst, err)
	}
	mt, payload, err := m.Payload()
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("get manifest %s: %w", dgst, err)
	}
	return ocispec.Descriptor{MediaType: mt, Digest: dgst, Size: int64(len(payload))}, nil
}

// blobOpener gives the delta planner the registry's blobs.
type blobOpener struct {
	ns distribution.Namespace
}

func (b blobOpener) OpenBlob(ctx context.Context, repository string, dgst digest.Digest) (io.ReadSeekCloser, error) {
	named, err := reference.WithName(repository)
	if err != nil {
		return nil, err
	}
	repo, err := b.ns.Repository(ctx, named)
	if err != nil {
		return nil, err
	}
	rc, err := repo.Blobs(ctx).Open(ctx, dgst)
	if errors.Is(err, distribution.ErrBlobUnknown) {
		// Manifests are linked as manifests, not layers, in a repository;
		// the planner reads them through here too.
		if ms, merr := repo.Manifests(ctx); merr == nil {
			if m, gerr := ms.Get(ctx, dgst); gerr == nil {
				if _, p, perr := m.Payload(); perr == nil {
					return nopSeekCloser{bytes.NewReader(p)}, nil
				}
			}
		}
		return nil, fmt.Errorf("blob %s in %s: %w", dgst, repository, fs.ErrNotExist)
	}
	return rc, err
}

type nopSeekCloser struct{ *bytes.Reader }

func (nopSeekCloser) Close() error { return nil }
