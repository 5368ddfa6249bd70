package delta

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/api/bundle"
	"github.com/starlight-project/starlight/schema"
)

// Plan computes the bundle for the converted platform manifest
// manifestDigest of repository: the header (manifest, config, every layer's
// tree, the frames in stream order, the statistics) and, for every frame of
// header.Frames, where its raw bytes live. The frames of the stream proper
// are header.Frames[header.Resume:].
//
// Plan is deterministic: identical requests against an unchanged index
// yield identical frames, which is what makes Resume work.
func (p *Planner) Plan(ctx context.Context, repository string, manifestDigest digest.Digest, req api.DeltaRequest) (*api.BundleHeader, []Source, error) {
	have, err := validateRequest(req)
	if err != nil {
		return nil, nil, err
	}
	layers, err := p.index.ManifestTrees(ctx, manifestDigest.String())
	switch {
	case errors.Is(err, schema.ErrNotFound):
		return nil, nil, fmt.Errorf("%w: manifest %s is not indexed", ErrNotFound, manifestDigest)
	case err != nil:
		return nil, nil, fmt.Errorf("reading the index: %w", err)
	}
	if layers == nil {
		// A manifest without layers: the header says "layers": [], not null.
		layers = []api.LayerTree{}
	}
	h := &api.BundleHeader{
		Repository:     repository,
		ManifestDigest: manifestDigest.String(),
		Layers:         layers,
	}
	for i := range layers {
		if err := checkTree(&layers[i]); err != nil {
			return nil, nil, err
		}
		h.Stats.Files += len(layers[i].Entries)
	}
	m, err := p.readManifest(ctx, repository, manifestDigest, layers)
	if err != nil {
		return nil, nil, err
	}
	h.Manifest, h.ManifestMediaType, h.ConfigDigest = m.raw, m.mediaType, m.config.String()
	if h.Config, err = p.readBlob(ctx, repository, m.config, maxConfigSize); err != nil {
		return nil, nil, fmt.Errorf("reading config: %w", err)
	}

	originals, err := p.originalLayers(ctx, repository, manifestDigest, len(layers))
	if err != nil {
		return nil, nil, err
	}
	for i, o := range originals {
		if o != h.Layers[i].Digest {
			h.Layers[i].OriginalDigest = o
		}
	}

	held, err := p.heldContents(ctx, have, imageContents(h.Layers))
	if err != nil {
		return nil, nil, err
	}
	cands := candidates(h.Layers, held, &h.Stats)
	if p.priority != nil {
		if err := p.priority.Rank(ctx, repository, manifestDigest, h.Layers, cands); err != nil {
			return nil, nil, fmt.Errorf("ranking frames: %w", err)
		}
	}
	sortCandidates(cands)

	h.Frames = make([]api.Frame, len(cands))
	sources := make([]Source, len(cands))
	for i := range cands {
		h.Frames[i] = cands[i].Frame
		sources[i] = cands[i].Source
	}
	if req.Resume > len(h.Frames) {
		return nil, nil, fmt.Errorf("%w: resume %d is past the %d frames of the bundle", ErrBadRequest, req.Resume, len(h.Frames))
	}
	h.Resume = req.Resume
	return h, sources, nil
}

// validateRequest checks the parts of an untrusted request the Planner
// uses and returns the Have digests without duplicates.
func validateRequest(req api.DeltaRequest) ([]string, error) {
	if req.Resume < 0 {
		return nil, fmt.Errorf("%w: negative resume %d", ErrBadRequest, req.Resume)
	}
	if len(req.Have) > MaxHave {
		return nil, fmt.Errorf("%w: %d layers in have, at most %d are accepted", ErrBadRequest, len(req.Have), MaxHave)
	}
	seen := make(map[string]struct{}, len(req.Have))
	have := make([]string, 0, len(req.Have))
	for _, s := range req.Have {
		d, err := api.ParseDigest(s)
		if err != nil {
			return nil, fmt.Errorf("%w: have: %w", ErrBadRequest, err)
		}
		if _, dup := seen[d.String()]; dup {
			continue
		}
		seen[d.String()] = struct{}{}
		have = append(have, d.String())
	}
	return have, nil
}

// maxOriginals bounds how many pushed manifests originalLayers reads for
// one converted manifest (normally one; several only when different pushes
// convert to the same image).
const maxOriginals = 8

// originalLayers returns, for each layer of the converted manifest, the
// layer of the pushed platform manifest it replaces, by position ("" where
// it is the layer itself or unknown). Several pushed manifests may convert
// to the same one (the same layers compressed differently): a position is
// filled only where all of them agree, so the header never names a wrong
// original. A pushed manifest that is the converted one (pushed already
// as eStargz) adds nothing: its layers are their own originals.
func (p *Planner) originalLayers(ctx context.Context, repository string, manifestDigest digest.Digest, n int) ([]string, error) {
	pushed, err := p.index.OriginalManifests(ctx, repository, manifestDigest.String())
	if err != nil {
		return nil, fmt.Errorf("mapping layers to the pushed ones: %w", err)
	}
	var originals []digest.Digest
	for _, s := range pushed {
		if d, err := api.ParseDigest(s); err == nil && len(originals) < maxOriginals {
			originals = append(originals, d)
		}
	}
	out := make([]string, n)
	for k, o := range originals {
		layers, err := p.manifestLayerDigests(ctx, repository, o)
		if err != nil {
			// The mapping only spares the worker a download: an original
			// manifest that cannot be read leaves it out, it does not
			// fail the bundle.
			log.G(ctx).WithError(err).WithField("original", o).Warn("cannot map converted layers to the pushed ones")
			return make([]string, n), nil
		}
		if len(layers) != n {
			return make([]string, n), nil
		}
		for i, l := range layers {
			switch {
			case k == 0:
				out[i] = l
			case out[i] != l:
				out[i] = ""
			}
		}
	}
	return out, nil
}

// manifestLayerDigests reads a stored platform manifest's layer digests.
func (p *Planner) manifestLayerDigests(ctx context.Context, repository string, dgst digest.Digest) ([]string, error) {
	raw, err := p.readBlob(ctx, repository, dgst, maxManifestSize)
	if err != nil {
		return nil, err
	}
	var m struct {
		Layers []struct {
			Digest string `json:"digest"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("manifest %s: %w", dgst, err)
	}
	out := make([]string, len(m.Layers))
	for i, l := range m.Layers {
		d, err := api.ParseDigest(l.Digest)
		if err != nil {
			return nil, fmt.Errorf("manifest %s: layer %d: %w", dgst, i, err)
		}
		out[i] = d.String()
	}
	return out, nil
}

type manifest struct {
	raw       []byte
	mediaType string
	config    digest.Digest
}

// readManifest reads the stored manifest and checks it against the index.
func (p *Planner) readManifest(ctx context.Context, repository string, dgst digest.Digest, layers []api.LayerTree) (*manifest, error) {
	raw, err := p.readBlob(ctx, repository, dgst, maxManifestSize)
	if err != nil {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	var m struct {
		MediaType string             `json:"mediaType"`
		Config    ocispec.Descriptor `json:"config"`
		Layers    []struct {
			Digest string `json:"digest"`
		} `json:"layers"`
		Manifests json.RawMessage `json:"manifests"`
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("manifest %s: %w", dgst, err)
	}
	if m.Manifests != nil {
		return nil, fmt.Errorf("manifest %s is an index, not a platform manifest", dgst)
	}
	config, err := api.ParseDigest(m.Config.Digest.String())
	if err != nil {
		return nil, fmt.Errorf("manifest %s: config: %w", dgst, err)
	}
	if len(m.Layers) != len(layers) {
		return nil, fmt.Errorf("manifest %s has %d layers, the index %d", dgst, len(m.Layers), len(layers))
	}
	for i, l := range m.Layers {
		if l.Digest != layers[i].Digest {
			return nil, fmt.Errorf("manifest %s: layer %d is %s, the index says %s", dgst, i, l.Digest, layers[i].Digest)
		}
	}
	mt := m.MediaType
	if mt == "" {
		// mediaType is optional in an OCI manifest.
		mt = ocispec.MediaTypeImageManifest
	}
	return &manifest{raw: raw, mediaType: mt, config: config}, nil
}

// readBlob reads a small blob (manifest, config) whole and verifies it.
func (p *Planner) readBlob(ctx context.Context, repository string, dgst digest.Digest, limit int64) ([]byte, error) {
	rc, err := p.blobs.OpenBlob(ctx, repository, dgst)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", dgst, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, limit+1))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", dgst, err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s exceeds %d bytes", dgst, limit)
	}
	if got := dgst.Algorithm().FromBytes(b); got != dgst {
		return nil, fmt.Errorf("stored %s has digest %s", dgst, got)
	}
	return b, nil
}

// checkTree checks a layer tree read from the index. The index is ours,
// but a bad row would make every worker reject the header: fail here with
// a clear message instead.
func checkTree(l *api.LayerTree) error {
	for i := range l.Entries {
		e := &l.Entries[i]
		if err := e.Validate(); err != nil {
			return fmt.Errorf("index of layer %s: %w", l.Digest, err)
		}
		for _, c := range e.Chunks {
			if c.CompressedSize <= 0 || c.CompressedSize > bundle.MaxFrameCompressed || c.Size > bundle.MaxFrameUncompressed {
				return fmt.Errorf("index of layer %s: %s: chunk at %d does not fit a bundle frame", l.Digest, e.Name, c.Offset)
			}
		}
	}
	return nil
}

// hasContent reports whether e carries content that travels in frames.
func hasContent(e *api.Entry) bool {
	return e.Type == api.TypeReg && e.Size > 0
}

// imageContents returns the set of content digests of an image.
func imageContents(layers []api.LayerTree) map[string]struct{} {
	set := make(map[string]struct{})
	for i := range layers {
		for j := range layers[i].Entries {
			if e := &layers[i].Entries[j]; hasContent(e) {
				set[e.Digest] = struct{}{}
			}
		}
	}
	return set
}

// heldContents returns the contents of need that appear in any of the
// layers the worker holds, in whatever image or repository they were
// indexed. Only digests in need are kept, so memory is bounded by the
// image, not by the worker's inventory.
func (p *Planner) heldContents(ctx context.Context, have []string, need map[string]struct{}) (map[string]struct{}, error) {
	if len(have) == 0 || len(need) == 0 {
		return map[string]struct{}{}, nil
	}
	held, err := p.index.ContentsInLayers(ctx, have, need)
	if err != nil {
		return nil, fmt.Errorf("looking up the contents of held layers: %w", err)
	}
	return held, nil
}

// candidates lists the chunks of every distinct content of the image the
// worker does not hold, taken from the first layer (base first) and the
// first file (TOC order) that holds the content, and fills the byte
// statistics.
func candidates(layers []api.LayerTree, held map[string]struct{}, st *api.BundleStats) []Candidate {
	seen := make(map[string]struct{})
	var cands []Candidate
	for li := range layers {
		l := &layers[li]
		for ei := range l.Entries {
			e := &l.Entries[ei]
			if !hasContent(e) {
				continue
			}
			if _, dup := seen[e.Digest]; dup {
				continue
			}
			seen[e.Digest] = struct{}{}
			var size int64
			for _, c := range e.Chunks {
				size += c.CompressedSize
			}
			st.ImageBytes += size
			if _, ok := held[e.Digest]; ok {
				st.DedupBytes += size
				continue
			}
			st.SendBytes += size
			st.Contents++
			for _, c := range e.Chunks {
				cands = append(cands, Candidate{
					Frame: api.Frame{
						Digest:         e.Digest,
						Offset:         c.Offset,
						Size:           c.Size,
						ChunkDigest:    c.Digest,
						CompressedSize: c.CompressedSize,
					},
					Source: Source{
						Layer:  digest.Digest(l.Digest),
						Offset: c.CompressedOffset,
						Size:   c.CompressedSize,
					},
					Layer: li,
					Entry: ei,
					Name:  e.Name,
				})
			}
		}
	}
	return cands
}
