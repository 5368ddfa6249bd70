// Package remote implements convert.Store over two repositories of standard
// registries, read and written through the resolver of an api/remote
// Client, so that an image can be converted for a registry without the
// Starlight extension.
package remote

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/containerd/containerd/images"
	"github.com/containerd/containerd/remotes"
	"github.com/containerd/errdefs"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
	registry "github.com/starlight-project/starlight/api/remote"
)

// Options configure a Store.
type Options struct {
	// Client reaches the registries (hosts, TLS, credentials). nil means
	// HTTPS without credentials.
	Client *registry.Client
	// Progress, if set, receives one line per blob copied or pushed.
	Progress io.Writer
}

// Store reads from the source repository and writes to the destination
// repository. Before a manifest or index is pushed, every blob it refers to
// that the destination lacks is copied from the source, so a converted image
// whose unchanged parts live only in the source is complete in the
// destination.
type Store struct {
	opts    Options
	src     string // normalized source reference
	dstRepo string // destination repository, without tag
	fetcher remotes.Fetcher
	pusher  remotes.Pusher

	mu    sync.Mutex
	local map[digest.Digest][]byte // small blobs made locally (filtered indexes)
}

// New resolves the source reference and prepares pushes to the destination
// repository. It returns the store and the source root descriptor.
func New(ctx context.Context, src, dst string, opts Options) (*Store, ocispec.Descriptor, error) {
	srcRef, err := reference.ParseDockerRef(src)
	if err != nil {
		return nil, ocispec.Descriptor{}, fmt.Errorf("source %q: %w", src, err)
	}
	dstRef, err := reference.ParseDockerRef(dst)
	if err != nil {
		return nil, ocispec.Descriptor{}, fmt.Errorf("destination %q: %w", dst, err)
	}
	if opts.Client == nil {
		opts.Client = registry.New(registry.Options{})
	}
	s := &Store{opts: opts, src: srcRef.String(), dstRepo: reference.TrimNamed(dstRef).String(), local: map[digest.Digest][]byte{}}
	r := s.opts.Client.Resolver()
	name, desc, err := r.Resolve(ctx, s.src)
	if err != nil {
		return nil, ocispec.Descriptor{}, fmt.Errorf("resolving %s: %w", s.src, err)
	}
	if s.fetcher, err = r.Fetcher(ctx, name); err != nil {
		return nil, ocispec.Descriptor{}, err
	}
	if s.pusher, err = r.Pusher(ctx, s.dstRepo); err != nil {
		return nil, ocispec.Descriptor{}, err
	}
	return s, desc, nil
}

// Fetch reads a blob or manifest of the source.
func (s *Store) Fetch(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	s.mu.Lock()
	b, ok := s.local[desc.Digest]
	s.mu.Unlock()
	if ok {
		return io.NopCloser(bytes.NewReader(b)), nil
	}
	return s.fetcher.Fetch(ctx, desc)
}

// AddLocal makes a small blob created by the caller (a filtered index)
// fetchable, without pushing it anywhere.
func (s *Store) AddLocal(desc ocispec.Descriptor, b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.local[desc.Digest] = b
}

// Push writes a blob or manifest to the destination repository (by digest).
func (s *Store) Push(ctx context.Context, desc ocispec.Descriptor, r io.Reader) error {
	if isManifest(desc.MediaType) {
		b, err := io.ReadAll(io.LimitReader(r, api.MaxManifestSize+1))
		if err != nil {
			return err
		}
		if err := s.ensureChildren(ctx, desc, b); err != nil {
			return err
		}
		r = bytes.NewReader(b)
	}
	return s.push(ctx, s.pusher, desc, r)
}

func (s *Store) push(ctx context.Context, p remotes.Pusher, desc ocispec.Descriptor, r io.Reader) error {
	w, err := p.Push(ctx, desc)
	if errdefs.IsAlreadyExists(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("pushing %s: %w", desc.Digest, err)
	}
	defer w.Close()
	if _, err := io.Copy(w, r); err != nil {
		return fmt.Errorf("pushing %s: %w", desc.Digest, err)
	}
	if err := w.Commit(ctx, desc.Size, desc.Digest); err != nil && !errdefs.IsAlreadyExists(err) {
		return fmt.Errorf("pushing %s: %w", desc.Digest, err)
	}
	s.progress("pushed   %s %s (%s)", kind(desc.MediaType), desc.Digest, human(desc.Size))
	return nil
}

// Ensure makes sure the destination holds desc and everything it refers to,
// copying what it lacks from the source.
func (s *Store) Ensure(ctx context.Context, desc ocispec.Descriptor) error {
	if !isManifest(desc.MediaType) {
		w, err := s.pusher.Push(ctx, desc)
		if errdefs.IsAlreadyExists(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("pushing %s: %w", desc.Digest, err)
		}
		defer w.Close()
		rc, err := s.Fetch(ctx, desc)
		if err != nil {
			return fmt.Errorf("fetching %s: %w", desc.Digest, err)
		}
		defer rc.Close()
		if _, err := io.Copy(w, rc); err != nil {
			return fmt.Errorf("copying %s: %w", desc.Digest, err)
		}
		if err := w.Commit(ctx, desc.Size, desc.Digest); err != nil && !errdefs.IsAlreadyExists(err) {
			return fmt.Errorf("copying %s: %w", desc.Digest, err)
		}
		s.progress("copied   %s %s (%s)", kind(desc.MediaType), desc.Digest, human(desc.Size))
		return nil
	}
	b, err := s.readManifest(ctx, desc)
	if err != nil {
		return err
	}
	return s.Push(ctx, desc, bytes.NewReader(b))
}

// Tag points tag of the destination repository to the pushed root desc.
func (s *Store) Tag(ctx context.Context, dst string, desc ocispec.Descriptor) error {
	ref, err := reference.ParseDockerRef(dst)
	if err != nil {
		return err
	}
	b, err := s.readManifest(ctx, desc)
	if err != nil {
		return err
	}
	if err := s.ensureChildren(ctx, desc, b); err != nil {
		return err
	}
	// A fresh resolver: the first one's tracker already marks this digest
	// as pushed and would skip the tag.
	p, err := s.opts.Client.Resolver().Pusher(ctx, ref.String())
	if err != nil {
		return err
	}
	if err := s.push(ctx, p, desc, bytes.NewReader(b)); err != nil {
		return err
	}
	s.progress("tagged   %s -> %s", ref, desc.Digest)
	return nil
}

// readManifest reads a manifest from the source, or from the destination
// where the conversion pushed it.
func (s *Store) readManifest(ctx context.Context, desc ocispec.Descriptor) ([]byte, error) {
	// A fetcher opens lazily: a manifest missing from the source shows
	// when it is read.
	b, err := readVerified(ctx, s.Fetch, desc)
	if err != nil {
		dst, derr := s.opts.Client.Resolver().Fetcher(ctx, s.dstRepo)
		if derr == nil {
			b, derr = readVerified(ctx, dst.Fetch, desc)
		}
		if derr != nil {
			return nil, fmt.Errorf("fetching %s: from the source: %v; from the destination: %w", desc.Digest, err, derr)
		}
	}
	return b, nil
}

// readVerified reads a manifest with fetch and checks its digest.
func readVerified(ctx context.Context, fetch func(context.Context, ocispec.Descriptor) (io.ReadCloser, error), desc ocispec.Descriptor) ([]byte, error) {
	rc, err := fetch(ctx, desc)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, api.MaxManifestSize+1))
	if err != nil {
		return nil, err
	}
	if digest.FromBytes(b) != desc.Digest {
		return nil, errors.New("content does not match its digest")
	}
	return b, nil
}

// ensureChildren copies the blobs and manifests a manifest refers to.
func (s *Store) ensureChildren(ctx context.Context, desc ocispec.Descriptor, b []byte) error {
	var m struct {
		Config    *ocispec.Descriptor  `json:"config"`
		Layers    []ocispec.Descriptor `json:"layers"`
		Manifests []ocispec.Descriptor `json:"manifests"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("%s: %w", desc.Digest, err)
	}
	children := append(m.Manifests, m.Layers...)
	if m.Config != nil && m.Config.Digest != "" {
		children = append(children, *m.Config)
	}
	var errs []error
	for _, c := range children {
		if err := s.Ensure(ctx, c); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (s *Store) progress(format string, args ...any) {
	if s.opts.Progress != nil {
		fmt.Fprintf(s.opts.Progress, format+"\n", args...)
	}
}

func isManifest(mediaType string) bool {
	switch mediaType {
	case ocispec.MediaTypeImageManifest, ocispec.MediaTypeImageIndex,
		images.MediaTypeDockerSchema2Manifest, images.MediaTypeDockerSchema2ManifestList:
		return true
	}
	return false
}

func kind(mediaType string) string {
	switch {
	case isManifest(mediaType):
		return "manifest"
	case images.IsConfigType(mediaType):
		return "config  "
	default:
		return "layer   "
	}
}

func human(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
