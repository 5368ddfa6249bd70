package client

import (
	"context"
	"fmt"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/oci"
	"github.com/containerd/containerd/snapshots"

	"github.com/starlight-project/starlight/api"
)

// ContainerOptions describe a container made by NewContainer.
type ContainerOptions struct {
	// Ref is the image, as pulled; ID the new container's ID, also the
	// name of its rootfs snapshot.
	Ref, ID string
	// Snapshotter is the snapshotter of the rootfs ("starlight").
	Snapshotter string
	// Optimize traces the container: its first accesses are recorded and
	// kept until `ctr-starlight report`.
	Optimize bool
	// Args replace the image's command when not empty.
	Args []string
}

// NewContainer creates a container in containerd (not through the worker;
// c is a containerd client with the namespace set) whose rootfs is a new
// snapshot of the image in opts.Snapshotter. With Optimize the snapshot
// carries the labels that make the worker trace it. The container is
// started like any other: `ctr task start ID`.
func NewContainer(ctx context.Context, c *containerd.Client, opts ContainerOptions) (containerd.Container, error) {
	img, err := c.GetImage(ctx, opts.Ref)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w (pull it first: ctr-starlight pull %s)", opts.Ref, err, opts.Ref)
	}
	labels := map[string]string{api.LabelImageRef: opts.Ref}
	if opts.Optimize {
		labels[api.LabelOptimize] = "true"
	}
	specOpts := []oci.SpecOpts{oci.WithImageConfig(img)}
	if len(opts.Args) > 0 {
		specOpts = append(specOpts, oci.WithProcessArgs(opts.Args...))
	}
	ctr, err := c.NewContainer(ctx, opts.ID,
		containerd.WithImage(img),
		containerd.WithSnapshotter(opts.Snapshotter),
		containerd.WithNewSnapshot(opts.ID, img, snapshots.WithLabels(labels)),
		containerd.WithNewSpec(specOpts...),
	)
	if err != nil {
		return nil, fmt.Errorf("creating container %s: %w", opts.ID, err)
	}
	return ctr, nil
}
