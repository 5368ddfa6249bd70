package convert

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"maps"
	"os"
	"strconv"

	"github.com/containerd/containerd/images"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"

	"github.com/starlight-project/starlight/api"
)

// The OCI non-distributable layer types. image-spec deprecates them for
// producers (its constants are marked deprecated), but images carrying them
// still exist, and a converter must recognise them to refuse them.
const (
	mediaTypeLayerNonDistributable     = "application/vnd.oci.image.layer.nondistributable.v1.tar"
	mediaTypeLayerNonDistributableGzip = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
	mediaTypeLayerNonDistributableZstd = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
)

// ConvertImage converts the image src (a manifest or an index) in store:
// every layer not yet in eStargz is converted and pushed, then the configs,
// the manifests and, for an index, the index. Layers that already are
// eStargz with a verified TOC digest are kept as they are. The pushed image
// is never modified; a conversion is deterministic, so converting the same
// image twice yields the same digests.
func ConvertImage(ctx context.Context, store Store, src ocispec.Descriptor, opts Options) (*ImageResult, error) {
	opts = opts.withDefaults()
	switch src.MediaType {
	case ocispec.MediaTypeImageManifest, images.MediaTypeDockerSchema2Manifest:
		mr, err := convertManifest(ctx, store, src, nil, opts)
		if err != nil {
			return nil, err
		}
		return &ImageResult{Desc: mr.Desc, Manifests: []ManifestResult{*mr}}, nil
	case ocispec.MediaTypeImageIndex, images.MediaTypeDockerSchema2ManifestList:
		return convertIndex(ctx, store, src, opts)
	default:
		return nil, invalid(fmt.Errorf("image %s: unsupported media type %q", src.Digest, src.MediaType))
	}
}

func convertIndex(ctx context.Context, store Store, src ocispec.Descriptor, opts Options) (*ImageResult, error) {
	raw, err := readManifest(ctx, store, src, api.MaxManifestSize)
	if err != nil {
		return nil, err
	}
	var idx ocispec.Index
	if err := json.Unmarshal(raw, &idx); err != nil {
		return nil, invalid(fmt.Errorf("index %s: malformed JSON: %w", src.Digest, err))
	}
	res := &ImageResult{Desc: src}
	changed := false
	out := idx
	out.Manifests = make([]ocispec.Descriptor, len(idx.Manifests))
	for i, child := range idx.Manifests {
		out.Manifests[i] = child
		if !isImageManifest(child.MediaType) || child.Platform == nil ||
			child.Platform.OS == "unknown" || child.Platform.Architecture == "unknown" {
			// Attestations and other artifacts travel unchanged.
			continue
		}
		mr, err := convertManifest(ctx, store, child, child.Platform, opts)
		if err != nil {
			return nil, fmt.Errorf("platform %s: %w", platformString(*child.Platform), err)
		}
		res.Manifests = append(res.Manifests, *mr)
		if mr.Desc.Digest != child.Digest {
			changed = true
			out.Manifests[i] = mr.Desc
		}
	}
	if !changed {
		return res, nil
	}
	out.SchemaVersion = 2
	out.MediaType = ocispec.MediaTypeImageIndex
	desc, err := pushJSON(ctx, store, ocispec.MediaTypeImageIndex, out)
	if err != nil {
		return nil, fmt.Errorf("pushing index: %w", err)
	}
	res.Desc = desc
	return res, nil
}

// convertManifest converts one platform manifest. platform is the index's
// platform of the manifest, nil for a single-manifest image.
func convertManifest(ctx context.Context, store Store, src ocispec.Descriptor, platform *ocispec.Platform, opts Options) (*ManifestResult, error) {
	raw, err := readManifest(ctx, store, src, api.MaxManifestSize)
	if err != nil {
		return nil, err
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, invalid(fmt.Errorf("manifest %s: malformed JSON: %w", src.Digest, err))
	}
	switch m.Config.MediaType {
	case ocispec.MediaTypeImageConfig, images.MediaTypeDockerSchema2Config:
	default:
		return nil, invalid(fmt.Errorf("manifest %s: config media type %q is not a container image config", src.Digest, m.Config.MediaType))
	}
	cfgRaw, err := readManifest(ctx, store, m.Config, api.MaxConfigSize)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	cfg, diffIDs, err := parseConfig(cfgRaw)
	if err != nil {
		return nil, invalid(fmt.Errorf("config %s: %w", m.Config.Digest, err))
	}
	if len(diffIDs) != len(m.Layers) {
		return nil, invalid(fmt.Errorf("manifest %s: %d layers but %d diff_ids in the config", src.Digest, len(m.Layers), len(diffIDs)))
	}
	mr := &ManifestResult{Original: src, Desc: src, Config: m.Config}
	if platform != nil {
		mr.Platform = *platform
	} else {
		mr.Platform = configPlatform(cfg)
	}

	mr.Layers = make([]LayerResult, len(m.Layers))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(opts.Parallelism)
	for i, l := range m.Layers {
		g.Go(func() error {
			lr, err := convertImageLayer(gctx, store, l, diffIDs[i], opts)
			if err != nil {
				return fmt.Errorf("layer %d (%s): %w", i, l.Digest, err)
			}
			mr.Layers[i] = *lr
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}

	changed := false
	newDiffIDs := make([]digest.Digest, len(mr.Layers))
	layers := make([]ocispec.Descriptor, len(mr.Layers))
	for i, l := range mr.Layers {
		newDiffIDs[i] = l.DiffID
		layers[i] = l.Desc
		if !l.Reused {
			changed = true
		}
	}
	if !changed {
		return mr, nil
	}

	cfgOut, err := replaceDiffIDs(cfg, newDiffIDs)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", m.Config.Digest, err)
	}
	mr.Config = ocispec.Descriptor{
		MediaType: ocispec.MediaTypeImageConfig,
		Digest:    digest.FromBytes(cfgOut),
		Size:      int64(len(cfgOut)),
	}
	if err := store.Push(ctx, mr.Config, bytes.NewReader(cfgOut)); err != nil {
		return nil, fmt.Errorf("pushing config: %w", err)
	}
	out := ocispec.Manifest{
		Versioned:    specs.Versioned{SchemaVersion: 2},
		MediaType:    ocispec.MediaTypeImageManifest,
		ArtifactType: m.ArtifactType,
		Config:       mr.Config,
		Layers:       layers,
		Subject:      m.Subject,
		Annotations:  m.Annotations,
	}
	desc, err := pushJSON(ctx, store, ocispec.MediaTypeImageManifest, out)
	if err != nil {
		return nil, fmt.Errorf("pushing manifest: %w", err)
	}
	desc.Platform = platform
	desc.Annotations = src.Annotations
	mr.Desc = desc
	log.G(ctx).WithFields(log.Fields{"original": src.Digest, "converted": desc.Digest, "layers": len(layers)}).Info("converted manifest")
	return mr, nil
}

// convertImageLayer keeps an eStargz layer whose TOC digest it verified, or
// converts the layer and pushes the result.
func convertImageLayer(ctx context.Context, store Store, desc ocispec.Descriptor, diffID digest.Digest, opts Options) (*LayerResult, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, invalid(fmt.Errorf("layer descriptor: %w", err))
	}
	switch desc.MediaType {
	case ocispec.MediaTypeImageLayerGzip, images.MediaTypeDockerSchema2LayerGzip:
		if toc, ok := desc.Annotations[AnnotationTOCDigest]; ok {
			return reuseOrConvert(ctx, store, desc, diffID, digest.Digest(toc), opts)
		}
	case ocispec.MediaTypeImageLayer, images.MediaTypeDockerSchema2Layer, ocispec.MediaTypeImageLayerZstd:
	case images.MediaTypeDockerSchema2LayerForeign, images.MediaTypeDockerSchema2LayerForeignGzip,
		mediaTypeLayerNonDistributable, mediaTypeLayerNonDistributableGzip, mediaTypeLayerNonDistributableZstd:
		return nil, invalid(fmt.Errorf("foreign (non-distributable) layer of type %q cannot be converted: its blob is not in the registry", desc.MediaType))
	default:
		return nil, invalid(fmt.Errorf("unsupported layer media type %q", desc.MediaType))
	}
	rc, err := store.Fetch(ctx, desc)
	if err != nil {
		return nil, fmt.Errorf("fetching: %w", err)
	}
	defer rc.Close()
	vr := newVerifier(rc, desc)
	l, err := ConvertLayer(ctx, vr, opts)
	if err != nil {
		return nil, err
	}
	defer l.Close()
	// The tar may end before the blob does (padding): read the rest so the
	// whole blob is verified.
	if _, err := io.Copy(io.Discard, vr); err != nil {
		return nil, fmt.Errorf("fetching: %w", err)
	}
	return pushLayer(ctx, store, l, diffID)
}

// reuseOrConvert spools a layer that claims to be eStargz and keeps it if
// it is exactly what its conversion would index (verifyEStargz: tar rules
// and limits, TOC against the tar, chunks against their members, diff_id
// against the config), or converts it from its tar otherwise. A layer
// whose tar breaks the rules fails as a conversion would.
func reuseOrConvert(ctx context.Context, store Store, desc ocispec.Descriptor, diffID, toc digest.Digest, opts Options) (_ *LayerResult, retErr error) {
	f, err := spool(ctx, store, desc, opts.TempDir)
	if err != nil {
		return nil, err
	}
	defer removeTemp(f)
	idx, err := ReadIndex(f, desc.Size)
	if err == nil && idx.TOCDigest != toc {
		err = fmt.Errorf("TOC digest %s, annotation says %s", idx.TOCDigest, toc)
	}
	if err == nil {
		usize, tarDiffID, verr := verifyEStargz(ctx, f, desc.Size, idx, opts)
		switch {
		case verr == nil && tarDiffID != diffID:
			return nil, invalid(fmt.Errorf("uncompressed digest %s does not match the config's diff_id %s", tarDiffID, diffID))
		case verr == nil:
			idx.UncompressedSize = usize
			out := desc
			out.MediaType = ocispec.MediaTypeImageLayerGzip
			// The size annotation is the pusher's claim; the tar says.
			out.Annotations = maps.Clone(desc.Annotations) // has the TOC digest: not nil
			out.Annotations[AnnotationUncompressedSize] = strconv.FormatInt(usize, 10)
			return &LayerResult{Desc: out, DiffID: diffID, Index: idx, Reused: true}, nil
		case !errors.Is(verr, errNotReusable):
			return nil, verr
		}
		err = verr
	}
	log.G(ctx).WithError(err).WithField("layer", desc.Digest).Info("layer annotated as eStargz is not valid eStargz; converting it")
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	l, err := ConvertLayer(ctx, f, opts)
	if err != nil {
		return nil, err
	}
	defer l.Close()
	return pushLayer(ctx, store, l, diffID)
}

func pushLayer(ctx context.Context, store Store, l *Layer, diffID digest.Digest) (*LayerResult, error) {
	if l.SourceDiffID != diffID {
		return nil, invalid(fmt.Errorf("uncompressed digest %s does not match the config's diff_id %s", l.SourceDiffID, diffID))
	}
	if err := store.Push(ctx, l.Desc, l.File); err != nil {
		return nil, fmt.Errorf("pushing converted layer %s: %w", l.Desc.Digest, err)
	}
	log.G(ctx).WithFields(log.Fields{"converted": l.Desc.Digest, "size": l.Desc.Size, "files": len(l.Index.Entries)}).Debug("converted layer")
	return &LayerResult{Desc: l.Desc, DiffID: l.DiffID, Index: l.Index}, nil
}

// spool copies a blob into a temporary file, verifying its digest.
func spool(ctx context.Context, store Store, desc ocispec.Descriptor, dir string) (_ *os.File, retErr error) {
	rc, err := store.Fetch(ctx, desc)
	if err != nil {
		return nil, fmt.Errorf("fetching: %w", err)
	}
	defer rc.Close()
	f, err := os.CreateTemp(dir, "starlight-blob-*")
	if err != nil {
		return nil, fmt.Errorf("creating temporary file: %w", err)
	}
	defer func() {
		if retErr != nil {
			removeTemp(f)
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	if _, err := io.Copy(bw, &ctxReader{ctx: ctx, r: newVerifier(rc, desc)}); err != nil {
		return nil, fmt.Errorf("fetching: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return nil, err
	}
	return f, nil
}

// verifier checks that a blob has the size and digest its descriptor says,
// failing the read that reaches its end otherwise.
type verifier struct {
	r    io.Reader
	desc ocispec.Descriptor
	h    hash.Hash
	n    int64
}

func newVerifier(r io.Reader, desc ocispec.Descriptor) *verifier {
	return &verifier{r: r, desc: desc, h: desc.Digest.Algorithm().Hash()}
}

func (v *verifier) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	v.h.Write(p[:n])
	v.n += int64(n)
	if v.n > v.desc.Size {
		return n, fmt.Errorf("blob %s is larger than %d bytes", v.desc.Digest, v.desc.Size)
	}
	if errors.Is(err, io.EOF) {
		if v.n != v.desc.Size {
			return n, fmt.Errorf("blob %s: got %d of %d bytes: %w", v.desc.Digest, v.n, v.desc.Size, io.ErrUnexpectedEOF)
		}
		if got := digest.NewDigest(v.desc.Digest.Algorithm(), v.h); got != v.desc.Digest {
			return n, fmt.Errorf("blob %s: content has digest %s", v.desc.Digest, got)
		}
	}
	return n, err
}

// readManifest reads a small JSON blob (manifest, index, config), bounded
// by limit and verified.
func readManifest(ctx context.Context, store Store, desc ocispec.Descriptor, limit int64) ([]byte, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, invalid(fmt.Errorf("%s: %w", desc.MediaType, err))
	}
	if desc.Size < 0 || desc.Size > limit {
		return nil, invalid(fmt.Errorf("%s %s: size %d out of range", desc.MediaType, desc.Digest, desc.Size))
	}
	rc, err := store.Fetch(ctx, desc)
	if err != nil {
		return nil, fmt.Errorf("fetching %s: %w", desc.Digest, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(newVerifier(rc, desc), desc.Size+1))
	if err != nil {
		return nil, fmt.Errorf("fetching %s: %w", desc.Digest, err)
	}
	return b, nil
}

func pushJSON(ctx context.Context, store Store, mediaType string, v any) (ocispec.Descriptor, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	return desc, store.Push(ctx, desc, bytes.NewReader(b))
}

// parseConfig splits an image config into its top-level fields, kept as
// raw JSON so that everything but rootfs.diff_ids survives a rewrite.
func parseConfig(b []byte) (map[string]json.RawMessage, []digest.Digest, error) {
	var cfg map[string]json.RawMessage
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, nil, fmt.Errorf("malformed JSON: %w", err)
	}
	var rootfs struct {
		DiffIDs []digest.Digest `json:"diff_ids"`
	}
	if err := json.Unmarshal(cfg["rootfs"], &rootfs); err != nil {
		return nil, nil, fmt.Errorf("rootfs: %w", err)
	}
	for _, d := range rootfs.DiffIDs {
		if err := d.Validate(); err != nil {
			return nil, nil, fmt.Errorf("rootfs: %w", err)
		}
	}
	return cfg, rootfs.DiffIDs, nil
}

func replaceDiffIDs(cfg map[string]json.RawMessage, diffIDs []digest.Digest) ([]byte, error) {
	var rootfs map[string]json.RawMessage
	if err := json.Unmarshal(cfg["rootfs"], &rootfs); err != nil {
		return nil, fmt.Errorf("rootfs: %w", err)
	}
	ids, err := json.Marshal(diffIDs)
	if err != nil {
		return nil, err
	}
	rootfs["diff_ids"] = ids
	out := make(map[string]json.RawMessage, len(cfg))
	for k, v := range cfg {
		out[k] = v
	}
	if out["rootfs"], err = marshalNoEscape(rootfs); err != nil {
		return nil, err
	}
	return marshalNoEscape(out)
}

// marshalNoEscape marshals without HTML escaping, so that strings of the
// original config (commands with "&&", "<", ">") keep their bytes.
func marshalNoEscape(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

func configPlatform(cfg map[string]json.RawMessage) ocispec.Platform {
	var p ocispec.Platform
	json.Unmarshal(cfg["os"], &p.OS)                     //nolint:errcheck // best effort
	json.Unmarshal(cfg["architecture"], &p.Architecture) //nolint:errcheck
	json.Unmarshal(cfg["variant"], &p.Variant)           //nolint:errcheck
	return p
}

func isImageManifest(mediaType string) bool {
	return mediaType == ocispec.MediaTypeImageManifest || mediaType == images.MediaTypeDockerSchema2Manifest
}

func platformString(p ocispec.Platform) string {
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}
