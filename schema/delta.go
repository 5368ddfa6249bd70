package schema

import (
	"context"
	"fmt"
	"strings"
)

// LayerRepositories returns, for each of layers that a converted platform
// manifest of some repository lists, those repositories in name order, at
// most perLayer of them (the first in order). A layer no converted image
// lists is absent. The delta route uses it to count, among the layers a
// worker holds, only those of repositories the caller may pull: the
// contents of a layer are no business of a caller who may read none of
// the repositories holding it.
func (d *DB) LayerRepositories(ctx context.Context, layers []string, perLayer int) (map[string][]string, error) {
	out := make(map[string][]string)
	for start := 0; start < len(layers); start += maxParams {
		batch := layers[start:min(start+maxParams, len(layers))]
		args := make([]any, len(batch))
		for i, l := range batch {
			args[i] = l
		}
		rows, err := d.query(ctx, d.db, `SELECT DISTINCT ml.layer_digest, im.repository
			FROM manifest_layers ml JOIN image_manifests im ON im.manifest_digest = ml.manifest_digest
			WHERE ml.layer_digest IN (?`+strings.Repeat(",?", len(batch)-1)+`)
			ORDER BY ml.layer_digest, im.repository`, args...)
		if err != nil {
			return nil, fmt.Errorf("listing the repositories of %d layers: %w", len(layers), err)
		}
		for rows.Next() {
			var layer, repo string
			if err := rows.Scan(&layer, &repo); err != nil {
				rows.Close()
				return nil, fmt.Errorf("listing the repositories of %d layers: %w", len(layers), err)
			}
			if len(out[layer]) < perLayer {
				out[layer] = append(out[layer], repo)
			}
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, fmt.Errorf("listing the repositories of %d layers: %w", len(layers), err)
		}
	}
	return out, nil
}
