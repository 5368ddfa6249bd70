package schema

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Image is a pushed manifest or index and what it was converted to.
type Image struct {
	Repository         string
	Digest             string // as pushed
	MediaType          string
	State              string // api.StateQueued, ...
	ConvertedDigest    string
	ConvertedMediaType string
	Error              string
	Attempts           int
	CreatedAt          time.Time
	UpdatedAt          time.Time
}

// ImageManifest is one platform manifest of a converted image.
type ImageManifest struct {
	Platform       string // os/arch[/variant]
	OriginalDigest string // pushed platform manifest
	ManifestDigest string // converted platform manifest
	ConfigDigest   string
	// Layers are the converted layer digests, base first. They must have
	// been stored with PutLayer.
	Layers []string
}

const imageColumns = `repository, digest, media_type, state, converted_digest,
	converted_media_type, error, attempts, created_at, updated_at`

func scanImage(row interface{ Scan(...any) error }) (*Image, error) {
	var im Image
	var created, updated int64
	err := row.Scan(&im.Repository, &im.Digest, &im.MediaType, &im.State, &im.ConvertedDigest,
		&im.ConvertedMediaType, &im.Error, &im.Attempts, &created, &updated)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	im.CreatedAt, im.UpdatedAt = fromMillis(created), fromMillis(updated)
	return &im, nil
}

// Image returns the image pushed as digest in repository, or ErrNotFound.
func (d *DB) Image(ctx context.Context, repository, digest string) (*Image, error) {
	im, err := scanImage(d.queryRow(ctx, d.db,
		`SELECT `+imageColumns+` FROM images WHERE repository = ? AND digest = ?`, repository, digest))
	if err != nil && !errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("get image %s@%s: %w", repository, digest, err)
	}
	return im, err
}

// ImageByConverted returns the image of repository whose conversion
// produced the root convertedDigest, or ErrNotFound.
func (d *DB) ImageByConverted(ctx context.Context, repository, convertedDigest string) (*Image, error) {
	im, err := scanImage(d.queryRow(ctx, d.db,
		`SELECT `+imageColumns+` FROM images WHERE repository = ? AND converted_digest = ?
		 ORDER BY updated_at DESC LIMIT 1`, repository, convertedDigest))
	if err != nil && !errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("get image converted to %s@%s: %w", repository, convertedDigest, err)
	}
	return im, err
}

// UpsertImage inserts im or replaces the row of the same repository and
// digest, keeping its creation time.
func (d *DB) UpsertImage(ctx context.Context, im Image) error {
	now := d.nowMillis()
	_, err := d.exec(ctx, d.db, `INSERT INTO images (`+imageColumns+`)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (repository, digest) DO UPDATE SET
			media_type = excluded.media_type, state = excluded.state,
			converted_digest = excluded.converted_digest,
			converted_media_type = excluded.converted_media_type,
			error = excluded.error, attempts = excluded.attempts,
			updated_at = excluded.updated_at`,
		im.Repository, im.Digest, im.MediaType, im.State, im.ConvertedDigest,
		im.ConvertedMediaType, im.Error, im.Attempts, now, now)
	if err != nil {
		return fmt.Errorf("upsert image %s@%s: %w", im.Repository, im.Digest, err)
	}
	return nil
}

// SetImageState records the state, error text and attempt count of a
// conversion in progress or failed. A ready image keeps its state: its
// conversion is done, and a later job that only writes another converted
// tag reports its own failure in its job.
func (d *DB) SetImageState(ctx context.Context, repository, digest, state, errText string, attempts int) error {
	_, err := d.exec(ctx, d.db, `UPDATE images SET state = ?, error = ?, attempts = ?, updated_at = ?
		WHERE repository = ? AND digest = ? AND state <> 'ready'`,
		state, errText, attempts, d.nowMillis(), repository, digest)
	if err != nil {
		return fmt.Errorf("set state of image %s@%s: %w", repository, digest, err)
	}
	return nil
}

// CompleteImage records a finished conversion in one transaction: the
// converted root, its platform manifests and their layer lists, and the
// ready state. The layers must already be stored (PutLayer).
func (d *DB) CompleteImage(ctx context.Context, repository, digest, convertedDigest, convertedMediaType string, manifests []ImageManifest) error {
	err := d.inTx(ctx, func(tx *sql.Tx) error {
		if _, err := d.exec(ctx, tx, `DELETE FROM image_manifests WHERE repository = ? AND image_digest = ?`,
			repository, digest); err != nil {
			return err
		}
		for _, m := range manifests {
			if _, err := d.exec(ctx, tx, `INSERT INTO image_manifests
				(repository, image_digest, platform, original_digest, manifest_digest, config_digest)
				VALUES (?, ?, ?, ?, ?, ?)`,
				repository, digest, m.Platform, m.OriginalDigest, m.ManifestDigest, m.ConfigDigest); err != nil {
				return fmt.Errorf("platform %s: %w", m.Platform, err)
			}
			// A converted manifest's layer list never changes (the digest
			// covers it), so existing rows are kept.
			for i, l := range m.Layers {
				if _, err := d.exec(ctx, tx, `INSERT INTO manifest_layers (manifest_digest, position, layer_digest)
					VALUES (?, ?, ?) ON CONFLICT (manifest_digest, position) DO NOTHING`,
					m.ManifestDigest, i, l); err != nil {
					return fmt.Errorf("manifest %s layer %d: %w", m.ManifestDigest, i, err)
				}
			}
		}
		res, err := d.exec(ctx, tx, `UPDATE images SET state = 'ready', converted_digest = ?,
			converted_media_type = ?, error = '', updated_at = ? WHERE repository = ? AND digest = ?`,
			convertedDigest, convertedMediaType, d.nowMillis(), repository, digest)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return ErrNotFound
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("complete image %s@%s: %w", repository, digest, err)
	}
	return nil
}

// ImageManifests returns the platform manifests of a converted image with
// their layers, ordered by platform.
func (d *DB) ImageManifests(ctx context.Context, repository, digest string) ([]ImageManifest, error) {
	rows, err := d.query(ctx, d.db, `SELECT platform, original_digest, manifest_digest, config_digest
		FROM image_manifests WHERE repository = ? AND image_digest = ? ORDER BY platform`, repository, digest)
	if err != nil {
		return nil, fmt.Errorf("image manifests of %s@%s: %w", repository, digest, err)
	}
	var out []ImageManifest
	for rows.Next() {
		var m ImageManifest
		if err := rows.Scan(&m.Platform, &m.OriginalDigest, &m.ManifestDigest, &m.ConfigDigest); err != nil {
			rows.Close()
			return nil, err
		}
		out = append(out, m)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("image manifests of %s@%s: %w", repository, digest, err)
	}
	for i := range out {
		if out[i].Layers, err = d.ManifestLayers(ctx, out[i].ManifestDigest); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// ManifestLayers returns the layer digests of a converted manifest, base
// first.
func (d *DB) ManifestLayers(ctx context.Context, manifestDigest string) ([]string, error) {
	rows, err := d.query(ctx, d.db, `SELECT layer_digest FROM manifest_layers
		WHERE manifest_digest = ? ORDER BY position`, manifestDigest)
	if err != nil {
		return nil, fmt.Errorf("layers of manifest %s: %w", manifestDigest, err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var l string
		if err := rows.Scan(&l); err != nil {
			return nil, err
		}
		out = append(out, l)
	}
	return out, rows.Err()
}

// FindImageManifest finds the image of repository that has digest as the
// pushed or converted platform manifest, for requests that name a platform
// manifest instead of the pushed root. It returns ErrNotFound when none
// does.
func (d *DB) FindImageManifest(ctx context.Context, repository, digest string) (imageDigest string, m *ImageManifest, err error) {
	var im ImageManifest
	err = d.queryRow(ctx, d.db, `SELECT image_digest, platform, original_digest, manifest_digest, config_digest
		FROM image_manifests WHERE repository = ? AND (original_digest = ? OR manifest_digest = ?)
		ORDER BY image_digest LIMIT 1`, repository, digest, digest).
		Scan(&imageDigest, &im.Platform, &im.OriginalDigest, &im.ManifestDigest, &im.ConfigDigest)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil, ErrNotFound
	}
	if err != nil {
		return "", nil, fmt.Errorf("find image manifest %s@%s: %w", repository, digest, err)
	}
	if im.Layers, err = d.ManifestLayers(ctx, im.ManifestDigest); err != nil {
		return "", nil, err
	}
	return imageDigest, &im, nil
}

// IsConversionOutput reports whether digest is a manifest or index that
// the registry itself wrote while converting another image of repository.
// Pushing such a manifest again must not queue a conversion of it.
func (d *DB) IsConversionOutput(ctx context.Context, repository, digest string) (bool, error) {
	var n int
	err := d.queryRow(ctx, d.db, `SELECT
		(SELECT COUNT(*) FROM images WHERE repository = ? AND converted_digest = ? AND digest <> ?) +
		(SELECT COUNT(*) FROM image_manifests WHERE repository = ? AND manifest_digest = ? AND original_digest <> ?)`,
		repository, digest, digest, repository, digest, digest).Scan(&n)
	if err != nil {
		return false, fmt.Errorf("look up conversion output %s@%s: %w", repository, digest, err)
	}
	return n > 0, nil
}

// ImageCounts returns the number of distinct converted layers of an image
// and the number of entries in them.
func (d *DB) ImageCounts(ctx context.Context, repository, digest string) (layers, files int, err error) {
	err = d.queryRow(ctx, d.db, `SELECT COUNT(*), COALESCE(SUM(files), 0) FROM layers WHERE digest IN (
		SELECT ml.layer_digest FROM image_manifests im
		JOIN manifest_layers ml ON ml.manifest_digest = im.manifest_digest
		WHERE im.repository = ? AND im.image_digest = ?)`, repository, digest).Scan(&layers, &files)
	if err != nil {
		return 0, 0, fmt.Errorf("count layers of %s@%s: %w", repository, digest, err)
	}
	return layers, files, nil
}

// OriginalManifests returns the pushed platform manifests of repository
// that were converted to manifestDigest, without duplicates, in digest
// order. Several pushes may convert to the same manifest (the same layers
// compressed differently); a manifest pushed already converted (eStargz)
// is its own original and is left out.
func (d *DB) OriginalManifests(ctx context.Context, repository, manifestDigest string) ([]string, error) {
	rows, err := d.query(ctx, d.db, `
		SELECT DISTINCT original_digest FROM image_manifests
		WHERE repository = ? AND manifest_digest = ? AND original_digest <> manifest_digest
		ORDER BY original_digest`, repository, manifestDigest)
	if err != nil {
		return nil, fmt.Errorf("listing originals of %s@%s: %w", repository, manifestDigest, err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return nil, fmt.Errorf("listing originals of %s@%s: %w", repository, manifestDigest, err)
		}
		out = append(out, s)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("listing originals of %s@%s: %w", repository, manifestDigest, err)
	}
	return out, nil
}
