package harness

import (
	"archive/tar"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// ArchiveConfig is the part of an image config WriteArchive sets.
type ArchiveConfig struct {
	Env        []string // PATH=... when empty
	Cmd        []string // /bin/sh when empty
	WorkingDir string
	// History describes each layer (created_by); generic when shorter.
	History []string
}

// WriteArchive writes a `docker save` archive at path for an image named
// name made of the given uncompressed layer tars (base first) whose
// sha256 digests are diffIDs. The layer files are streamed, not read into
// memory. Images built outside the harness (the benchmark's Debian images)
// use it to reach `docker load`.
func WriteArchive(path, name string, layerFiles, diffIDs []string, cfg ArchiveConfig) (*Image, error) {
	if len(layerFiles) != len(diffIDs) {
		return nil, fmt.Errorf("archive %s: %d layers but %d diff IDs", name, len(layerFiles), len(diffIDs))
	}
	env := cfg.Env
	if len(env) == 0 {
		env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	}
	cmd := cfg.Cmd
	if len(cmd) == 0 {
		cmd = []string{"/bin/sh"}
	}
	history := make([]map[string]any, len(layerFiles))
	for i := range history {
		by := fmt.Sprintf("layer %d", i)
		if i < len(cfg.History) {
			by = cfg.History[i]
		}
		history[i] = map[string]any{"created": ModTime, "created_by": by}
	}
	config := map[string]any{"Env": env, "Cmd": cmd}
	if cfg.WorkingDir != "" {
		config["WorkingDir"] = cfg.WorkingDir
	}
	cfgJSON, err := json.Marshal(map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"created":      ModTime,
		"config":       config,
		"rootfs":       map[string]any{"type": "layers", "diff_ids": diffIDs},
		"history":      history,
	})
	if err != nil {
		return nil, err
	}
	cfgName := strings.TrimPrefix(Digest(cfgJSON), "sha256:") + ".json"
	layerNames := make([]string, len(layerFiles))
	for i, d := range diffIDs {
		layerNames[i] = strings.TrimPrefix(d, "sha256:") + "/layer.tar"
	}
	manifest, err := json.Marshal([]map[string]any{{"Config": cfgName, "RepoTags": []string{name}, "Layers": layerNames}})
	if err != nil {
		return nil, err
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	add := func(n string, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: n, Mode: 0o644, Size: int64(len(data)), ModTime: ModTime, Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	if err := add(cfgName, cfgJSON); err != nil {
		return nil, fmt.Errorf("archive %s: %w", name, err)
	}
	for i, lf := range layerFiles {
		if err := addFile(tw, layerNames[i], lf); err != nil {
			return nil, fmt.Errorf("archive %s: layer %s: %w", name, lf, err)
		}
	}
	if err := add("manifest.json", manifest); err != nil {
		return nil, fmt.Errorf("archive %s: %w", name, err)
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("archive %s: %w", name, err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("archive %s: %w", name, err)
	}
	return &Image{Spec: ImageSpec{Name: name}, Name: name, Archive: path, DiffIDs: diffIDs, Dir: filepath.Dir(path)}, nil
}
