package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/containerd/containerd/images"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"

	"github.com/starlight-project/starlight/api"
	registry "github.com/starlight-project/starlight/api/remote"
	"github.com/starlight-project/starlight/api/remote/dockerconfig"
	"github.com/starlight-project/starlight/convert"
	"github.com/starlight-project/starlight/convert/remote"
)

type convertOptions struct {
	plainHTTP   bool
	platforms   []string
	user        string
	tempDir     string
	chunkSize   int
	parallelism int
}

func init() {
	var o convertOptions
	cmd := &cobra.Command{
		Use:   "convert [flags] SRC DST",
		Short: "Convert an image to eStargz between standard registries",
		Long: `Convert an image to eStargz for a registry without the Starlight extension.

SRC is read, every layer not yet in eStargz is converted locally and pushed
to DST together with the blobs DST lacks, and DST is tagged. Layers already
in eStargz are kept. SRC is never modified.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runConvert(cmd.Context(), o, args[0], args[1])
		},
	}
	f := cmd.Flags()
	f.BoolVar(&o.plainHTTP, "plain-http", false, "use HTTP instead of HTTPS for the registries")
	f.StringSliceVar(&o.platforms, "platform", nil, "convert only these platforms of a multi-platform image (os/arch[/variant]; repeatable)")
	f.StringVarP(&o.user, "user", "u", "", "registry credentials as user[:password] (default: docker's config.json)")
	f.StringVar(&o.tempDir, "temp-dir", "", "where layers are spooled during conversion (default $TMPDIR)")
	f.IntVar(&o.chunkSize, "chunk-size", convert.DefaultChunkSize, "eStargz chunk size in bytes")
	f.IntVar(&o.parallelism, "parallel", 2, "layers converted concurrently")
	rootCmd.AddCommand(cmd)
}

func runConvert(ctx context.Context, o convertOptions, src, dst string) error {
	if ctx == nil {
		ctx = context.Background()
	}
	start := time.Now()
	// --plain-http and --user apply to both registries; without --user,
	// the credentials come from docker's config.json ($DOCKER_CONFIG or
	// ~/.docker: auths, credHelpers, credsStore).
	hc := registry.HostConfig{PlainHTTP: o.plainHTTP}
	userSource := ""
	if o.user != "" {
		user, pass, err := parseUser(o.user)
		if err != nil {
			return err
		}
		hc.Username, hc.Password, userSource = user, pass, "--user"
	}
	hosts := registry.NewHosts(registry.HostsOptions{
		Static:       func(string) registry.HostConfig { return hc },
		StaticSource: userSource,
		Credentials:  (&dockerconfig.File{}).Credentials,
	})
	client := registry.New(registry.Options{
		Hosts: hosts.Lookup, CredentialSource: hosts.CredentialSource,
		UserAgent: "ctr-starlight",
	})
	store, root, err := remote.New(ctx, src, dst, remote.Options{Client: client, Progress: os.Stderr})
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "resolved %s -> %s (%s)\n", src, root.Digest, root.MediaType)
	if len(o.platforms) > 0 {
		if root, err = selectPlatforms(ctx, store, root, o.platforms); err != nil {
			return err
		}
	}
	res, err := convert.ConvertImage(ctx, store, root, convert.Options{
		ChunkSize:   o.chunkSize,
		TempDir:     o.tempDir,
		Parallelism: o.parallelism,
	})
	if err != nil {
		return fmt.Errorf("converting %s: %w", src, err)
	}
	for _, m := range res.Manifests {
		reused := 0
		for _, l := range m.Layers {
			if l.Reused {
				reused++
			}
		}
		fmt.Fprintf(os.Stderr, "%-14s %s -> %s (%d layers, %d already eStargz)\n",
			platforms.Format(m.Platform), m.Original.Digest, m.Desc.Digest, len(m.Layers), reused)
	}
	if err := store.Tag(ctx, dst, res.Desc); err != nil {
		return fmt.Errorf("tagging %s: %w", dst, err)
	}
	fmt.Fprintf(os.Stderr, "done in %s\n", time.Since(start).Round(time.Millisecond))
	fmt.Println(res.Desc.Digest)
	return nil
}

// selectPlatforms narrows an index down to the wanted platforms: the
// manifest itself when one matches, a new index of the matches otherwise.
func selectPlatforms(ctx context.Context, store *remote.Store, root ocispec.Descriptor, want []string) (ocispec.Descriptor, error) {
	if root.MediaType != ocispec.MediaTypeImageIndex && root.MediaType != images.MediaTypeDockerSchema2ManifestList {
		return root, nil
	}
	var ps []ocispec.Platform
	for _, s := range want {
		p, err := platforms.Parse(s)
		if err != nil {
			return root, fmt.Errorf("--platform %q: %w", s, err)
		}
		ps = append(ps, p)
	}
	match := platforms.Any(ps...)
	rc, err := store.Fetch(ctx, root)
	if err != nil {
		return root, err
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, api.MaxManifestSize+1))
	if err != nil {
		return root, err
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		return root, fmt.Errorf("index %s: %w", root.Digest, err)
	}
	var kept []ocispec.Descriptor
	for _, m := range idx.Manifests {
		if m.Platform != nil && match.Match(*m.Platform) {
			kept = append(kept, m)
		}
	}
	switch len(kept) {
	case 0:
		return root, fmt.Errorf("no manifest of %s matches %s", root.Digest, strings.Join(want, ", "))
	case 1:
		return kept[0], nil
	}
	idx.Manifests = kept
	idx.MediaType = ocispec.MediaTypeImageIndex
	nb, err := json.Marshal(idx)
	if err != nil {
		return root, err
	}
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageIndex, Digest: digest.FromBytes(nb), Size: int64(len(nb))}
	store.AddLocal(desc, nb)
	return desc, nil
}
