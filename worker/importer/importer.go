// Package importer makes a Starlight image usable in containerd the way
// containerd's own pull-and-unpack leaves an image: manifest and config in
// its content store (the layer blobs stay remote), the committed snapshot
// chain in the starlight snapshotter, and the image record. It also runs
// the standard containerd pull a host without Starlight falls back to.
package importer

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/content"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/images"
	"github.com/containerd/containerd/leases"
	"github.com/containerd/containerd/remotes"
	"github.com/containerd/containerd/snapshots"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/starlight-project/starlight/api"
	"github.com/starlight-project/starlight/worker/snapshotter"
)

// SnapshotterName is the name containerd knows the worker's snapshotter by
// ([proxy_plugins.starlight]).
const SnapshotterName = "starlight"

// Importer talks to containerd. It connects at the first use, so that the
// worker can start before containerd does.
type Importer struct {
	address string
	mu      sync.Mutex
	c       *containerd.Client
}

// New returns an importer for the containerd at address (its socket).
func New(address string) *Importer {
	return &Importer{address: address}
}

// client returns the containerd client, connecting on first use.
func (im *Importer) client(ctx context.Context) (*containerd.Client, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.c != nil {
		return im.c, nil
	}
	c, err := containerd.New(im.address, containerd.WithTimeout(10*time.Second))
	if err != nil {
		return nil, fmt.Errorf("connecting to containerd at %s: %w", im.address, err)
	}
	im.c = c
	return c, nil
}

// Close closes the connection to containerd, if one was made.
func (im *Importer) Close() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.c == nil {
		return nil
	}
	err := im.c.Close()
	im.c = nil
	return err
}

// Plan is what a bundle header says about the image, checked for
// consistency: the manifest and config are the ones the digests name and
// the layers are the manifest's, in order.
type Plan struct {
	manifest ocispec.Descriptor
	config   ocispec.Descriptor
	// Layers are the converted layer digests, base first.
	Layers       []digest.Digest
	chainIDs     []digest.Digest
	manifestBlob []byte
	configBlob   []byte
}

// PlanImage checks a bundle header's manifest, config and layer trees
// against each other.
func PlanImage(h *api.BundleHeader) (*Plan, error) {
	md, err := api.ParseDigest(h.ManifestDigest)
	if err != nil {
		return nil, fmt.Errorf("bundle header: manifest: %w", err)
	}
	if got := digest.FromBytes(h.Manifest); got != md {
		return nil, fmt.Errorf("bundle header: manifest content has digest %s, header says %s", got, md)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(h.Manifest, &m); err != nil {
		return nil, fmt.Errorf("bundle header: manifest: %w", err)
	}
	mediaType := h.ManifestMediaType
	if mediaType == "" {
		mediaType = m.MediaType
	}
	switch mediaType {
	case ocispec.MediaTypeImageManifest, images.MediaTypeDockerSchema2Manifest:
	case "":
		mediaType = ocispec.MediaTypeImageManifest
	default:
		return nil, fmt.Errorf("bundle header: unsupported manifest media type %q", mediaType)
	}
	cd, err := api.ParseDigest(h.ConfigDigest)
	if err != nil {
		return nil, fmt.Errorf("bundle header: config: %w", err)
	}
	if m.Config.Digest != cd {
		return nil, fmt.Errorf("bundle header: manifest names config %s, header says %s", m.Config.Digest, cd)
	}
	if got := digest.FromBytes(h.Config); got != cd {
		return nil, fmt.Errorf("bundle header: config content has digest %s, header says %s", got, cd)
	}
	var img ocispec.Image
	if err := json.Unmarshal(h.Config, &img); err != nil {
		return nil, fmt.Errorf("bundle header: config: %w", err)
	}
	if len(m.Layers) != len(h.Layers) || len(img.RootFS.DiffIDs) != len(m.Layers) {
		return nil, fmt.Errorf("bundle header: %d layers in the manifest, %d diff IDs in the config, %d layer trees",
			len(m.Layers), len(img.RootFS.DiffIDs), len(h.Layers))
	}
	if len(m.Layers) == 0 {
		return nil, fmt.Errorf("bundle header: the image has no layers")
	}
	p := &Plan{
		manifest:     ocispec.Descriptor{MediaType: mediaType, Digest: md, Size: int64(len(h.Manifest))},
		config:       m.Config,
		manifestBlob: h.Manifest,
		configBlob:   h.Config,
	}
	p.config.Size = int64(len(h.Config))
	for i, l := range m.Layers {
		if l.Digest.String() != h.Layers[i].Digest {
			return nil, fmt.Errorf("bundle header: layer %d is %s in the manifest, %s in the trees", i, l.Digest, h.Layers[i].Digest)
		}
		if id := h.Layers[i].DiffID; id != "" && id != img.RootFS.DiffIDs[i].String() {
			return nil, fmt.Errorf("bundle header: layer %s has diff ID %s, the config says %s", l.Digest, id, img.RootFS.DiffIDs[i])
		}
		if err := img.RootFS.DiffIDs[i].Validate(); err != nil {
			return nil, fmt.Errorf("bundle header: config: diff ID %d: %w", i, err)
		}
		p.Layers = append(p.Layers, l.Digest)
	}
	p.chainIDs = identity.ChainIDs(append([]digest.Digest(nil), img.RootFS.DiffIDs...))
	return p, nil
}

// Import makes the image usable in containerd, the way containerd's
// own pull-and-unpack leaves it: manifest and config in the content store
// with GC labels (the layer blobs stay remote, like a remote snapshotter's),
// the image record named name, and the committed snapshot chain in the
// starlight snapshotter. Everything is created under a lease, so the
// garbage collector cannot take pieces before the image references them.
func (im *Importer) Import(ctx context.Context, name string, p *Plan) error {
	c, err := im.client(ctx)
	if err != nil {
		return err
	}
	ctx, done, err := c.WithLease(ctx, leases.WithRandomID(), leases.WithExpiration(time.Hour))
	if err != nil {
		return fmt.Errorf("creating containerd lease: %w", err)
	}
	defer done(context.WithoutCancel(ctx))

	cs := c.ContentStore()
	top := p.chainIDs[len(p.chainIDs)-1]
	configLabels := map[string]string{
		"containerd.io/gc.ref.snapshot." + SnapshotterName: top.String(),
	}
	if err := writeBlob(ctx, cs, p.config, p.configBlob, configLabels); err != nil {
		return err
	}
	manifestLabels := map[string]string{"containerd.io/gc.ref.content.config": p.config.Digest.String()}
	for i, l := range p.Layers {
		manifestLabels["containerd.io/gc.ref.content.l."+strconv.Itoa(i)] = l.String()
	}
	if err := writeBlob(ctx, cs, p.manifest, p.manifestBlob, manifestLabels); err != nil {
		return err
	}

	if err := createChain(ctx, c.SnapshotService(SnapshotterName), p); err != nil {
		return err
	}

	is := c.ImageService()
	img := images.Image{Name: name, Target: p.manifest}
	if _, err := is.Create(ctx, img); err != nil {
		if !errdefs.IsAlreadyExists(err) {
			return fmt.Errorf("creating image %s: %w", name, err)
		}
		if _, err := is.Update(ctx, img, "target"); err != nil {
			return fmt.Errorf("updating image %s: %w", name, err)
		}
	}
	return nil
}

func writeBlob(ctx context.Context, cs content.Store, desc ocispec.Descriptor, blob []byte, labels map[string]string) error {
	ref := "starlight-" + desc.Digest.String()
	if err := content.WriteBlob(ctx, cs, ref, bytes.NewReader(blob), desc, content.WithLabels(labels)); err != nil {
		return fmt.Errorf("writing %s to containerd: %w", desc.Digest, err)
	}
	// WriteBlob leaves an existing blob alone: set the labels anyway, the
	// blob may come from a pull into another snapshotter.
	info := content.Info{Digest: desc.Digest, Labels: labels}
	var fields []string
	for k := range labels {
		fields = append(fields, "labels."+k)
	}
	if _, err := cs.Update(ctx, info, fields...); err != nil {
		return fmt.Errorf("labelling %s in containerd: %w", desc.Digest, err)
	}
	return nil
}

// createChain commits the image's snapshot chain through containerd, with
// the remote-snapshotter protocol: each Prepare carries the target chain
// ID and the layer digest, and the starlight snapshotter answers
// "already exists" after committing the target itself.
func createChain(ctx context.Context, sn snapshots.Snapshotter, p *Plan) error {
	var parent string
	for i, chainID := range p.chainIDs {
		if _, err := sn.Stat(ctx, chainID.String()); err == nil {
			parent = chainID.String()
			continue
		} else if !errdefs.IsNotFound(err) {
			return fmt.Errorf("snapshot %s: %w", chainID, err)
		}
		key := fmt.Sprintf("extract-%s-%s", randomID(), chainID)
		labels := map[string]string{
			snapshotter.LabelSnapshotRef:          chainID.String(),
			snapshotter.LabelInheritedLayerDigest: p.Layers[i].String(),
		}
		err := prepareRetrying(ctx, sn, key, parent, labels)
		if err == nil {
			// The snapshotter made an empty active snapshot instead: it
			// does not know the layer. Nothing would fill it.
			if rerr := sn.Remove(ctx, key); rerr != nil {
				return fmt.Errorf("layer %s was not accepted by the %s snapshotter (and removing %s: %v)", p.Layers[i], SnapshotterName, key, rerr)
			}
			return fmt.Errorf("layer %s was not accepted by the %s snapshotter", p.Layers[i], SnapshotterName)
		}
		if !errdefs.IsAlreadyExists(err) {
			return fmt.Errorf("preparing snapshot %s of layer %s: %w", chainID, p.Layers[i], err)
		}
		parent = chainID.String()
	}
	return nil
}

func randomID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// PullPlain is the fallback for a host that is not a Starlight registry: a
// standard containerd pull of ref (fully qualified, as containerd's
// resolver wants it) for platform ("os/arch[/variant]"; empty is
// containerd's) through resolver, unpacked by containerd's default
// snapshotter.
func (im *Importer) PullPlain(ctx context.Context, ref, platform string, resolver remotes.Resolver) (images.Image, error) {
	c, err := im.client(ctx)
	if err != nil {
		return images.Image{}, err
	}
	img, err := c.Pull(ctx, ref, containerd.WithResolver(resolver), containerd.WithPullUnpack, containerd.WithPlatform(platform))
	if err != nil {
		return images.Image{}, fmt.Errorf("pulling %s: %w", ref, err)
	}
	return img.Metadata(), nil
}

// Delete removes the image record name from containerd and waits for
// containerd's garbage collector, so that the snapshots only it used are
// gone when Delete returns. found is false when containerd does not know
// the image.
func (im *Importer) Delete(ctx context.Context, name string) (found bool, err error) {
	c, err := im.client(ctx)
	if err != nil {
		return false, err
	}
	if err := c.ImageService().Delete(ctx, name, images.SynchronousDelete()); err != nil {
		if errdefs.IsNotFound(err) {
			return false, nil
		}
		return false, fmt.Errorf("removing %s from containerd: %w", name, err)
	}
	return true, nil
}

// Exists tells whether containerd has the image record name (in ctx's
// namespace).
func (im *Importer) Exists(ctx context.Context, name string) (bool, error) {
	c, err := im.client(ctx)
	if err != nil {
		return false, err
	}
	if _, err := c.ImageService().Get(ctx, name); err != nil {
		if errdefs.IsNotFound(err) {
			return false, nil
		}
		return false, fmt.Errorf("looking up %s in containerd: %w", name, err)
	}
	return true, nil
}

// prepareRetrying calls Prepare, retrying while containerd reports the
// starlight snapshotter unavailable. containerd dials a proxy snapshotter
// in the background from its own start; a dial that failed (containerd
// started before the worker, or raced the worker's bind and listen) leaves
// the connection in gRPC's reconnect backoff, during which calls fail at
// once with "unavailable" although the worker is serving.
func prepareRetrying(ctx context.Context, sn snapshots.Snapshotter, key, parent string, labels map[string]string) error {
	delay := 100 * time.Millisecond
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := sn.Prepare(ctx, key, parent, snapshots.WithLabels(labels))
		if !errdefs.IsUnavailable(err) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(delay):
		}
		delay = min(2*delay, 2*time.Second)
	}
}
