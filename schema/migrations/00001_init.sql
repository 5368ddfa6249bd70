-- Starlight index, version 1.
-- Portable SQL: runs unchanged on SQLite (embedded default) and PostgreSQL.
-- Natural keys (digests, repository names) instead of surrogate ids keep
-- the two dialects identical. Times are unix milliseconds, file mtimes unix
-- nanoseconds.

-- +goose Up

-- A pushed manifest or index, and what it was converted to.
CREATE TABLE images (
    repository           TEXT   NOT NULL,
    digest               TEXT   NOT NULL, -- as pushed
    media_type           TEXT   NOT NULL,
    state                TEXT   NOT NULL, -- queued|converting|ready|failed
    converted_digest     TEXT   NOT NULL DEFAULT '', -- converted root; equal to digest when already eStargz
    converted_media_type TEXT   NOT NULL DEFAULT '',
    error                TEXT   NOT NULL DEFAULT '',
    attempts             INTEGER NOT NULL DEFAULT 0,
    created_at           BIGINT NOT NULL,
    updated_at           BIGINT NOT NULL,
    PRIMARY KEY (repository, digest)
);
CREATE INDEX images_by_converted ON images (repository, converted_digest);
CREATE INDEX images_by_state ON images (state);

-- The platform manifests of a converted image (one row for a single
-- manifest, one per platform for an index).
CREATE TABLE image_manifests (
    repository      TEXT NOT NULL,
    image_digest    TEXT NOT NULL, -- images.digest
    platform        TEXT NOT NULL, -- os/arch[/variant]
    original_digest TEXT NOT NULL, -- pushed platform manifest
    manifest_digest TEXT NOT NULL, -- converted platform manifest
    config_digest   TEXT NOT NULL,
    PRIMARY KEY (repository, image_digest, platform)
);
CREATE INDEX image_manifests_by_manifest ON image_manifests (manifest_digest);
CREATE INDEX image_manifests_by_original ON image_manifests (repository, original_digest);

-- Converted (eStargz) layer blobs, shared by every manifest that uses them.
CREATE TABLE layers (
    digest            TEXT    NOT NULL PRIMARY KEY,
    diff_id           TEXT    NOT NULL,
    size              BIGINT  NOT NULL,
    toc_digest        TEXT    NOT NULL,
    uncompressed_size BIGINT  NOT NULL,
    files             INTEGER NOT NULL,
    created_at        BIGINT  NOT NULL
);

CREATE TABLE manifest_layers (
    manifest_digest TEXT    NOT NULL,
    position        INTEGER NOT NULL, -- 0 = base layer
    layer_digest    TEXT    NOT NULL,
    PRIMARY KEY (manifest_digest, position)
);
CREATE INDEX manifest_layers_by_layer ON manifest_layers (layer_digest);

-- Every entry of every converted layer, in TOC order.
CREATE TABLE files (
    layer_digest TEXT    NOT NULL,
    position     INTEGER NOT NULL,
    name         TEXT    NOT NULL,
    type         TEXT    NOT NULL,
    mode         INTEGER NOT NULL,
    uid          INTEGER NOT NULL,
    gid          INTEGER NOT NULL,
    size         BIGINT  NOT NULL,
    mtime        BIGINT  NOT NULL,
    link_name    TEXT    NOT NULL DEFAULT '',
    dev_major    BIGINT  NOT NULL DEFAULT 0,
    dev_minor    BIGINT  NOT NULL DEFAULT 0,
    xattrs       TEXT    NOT NULL DEFAULT '', -- JSON object of base64 values, '' when none
    digest       TEXT    NOT NULL DEFAULT '', -- content sha256 of a non-empty regular file
    PRIMARY KEY (layer_digest, position)
);
CREATE INDEX files_by_digest ON files (digest);
CREATE INDEX files_by_name ON files (layer_digest, name);

-- The eStargz chunks of regular files: where each raw gzip member sits in
-- the layer blob, so a bundle can copy it without recompressing.
CREATE TABLE chunks (
    layer_digest      TEXT   NOT NULL,
    file_position     INTEGER NOT NULL,
    chunk_offset      BIGINT NOT NULL,
    chunk_size        BIGINT NOT NULL,
    chunk_digest      TEXT   NOT NULL,
    compressed_offset BIGINT NOT NULL,
    compressed_size   BIGINT NOT NULL,
    PRIMARY KEY (layer_digest, file_position, chunk_offset)
);

-- Durable conversion queue. One row per (image, tag) pushed; tag is '' for
-- a push by digest. A job that fails is retried until attempts run out.
CREATE TABLE jobs (
    repository  TEXT    NOT NULL,
    digest      TEXT    NOT NULL,
    tag         TEXT    NOT NULL DEFAULT '',
    state       TEXT    NOT NULL, -- queued|converting|ready|failed
    attempts    INTEGER NOT NULL DEFAULT 0,
    error       TEXT    NOT NULL DEFAULT '',
    not_before  BIGINT  NOT NULL DEFAULT 0, -- earliest next attempt
    lease_until BIGINT  NOT NULL DEFAULT 0, -- a running job's lease; expired leases are retaken after a crash
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (repository, digest, tag)
);
CREATE INDEX jobs_by_state ON jobs (state, not_before);

-- Startup traces as reported by workers; id is the sha256 of the canonical
-- report, which makes a repeated upload a no-op.
CREATE TABLE traces (
    id              TEXT   NOT NULL PRIMARY KEY,
    repository      TEXT   NOT NULL,
    manifest_digest TEXT   NOT NULL, -- converted platform manifest
    worker          TEXT   NOT NULL DEFAULT '',
    created_at      BIGINT NOT NULL
);
CREATE INDEX traces_by_manifest ON traces (manifest_digest);

CREATE TABLE trace_entries (
    trace_id     TEXT    NOT NULL,
    seq          INTEGER NOT NULL, -- order of first access in the run
    layer_digest TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    digest       TEXT    NOT NULL DEFAULT '',
    chunk_offset BIGINT  NOT NULL DEFAULT 0,
    time_ns      BIGINT  NOT NULL, -- since container start
    PRIMARY KEY (trace_id, seq)
);

-- +goose Down
DROP TABLE trace_entries;
DROP TABLE traces;
DROP TABLE jobs;
DROP TABLE chunks;
DROP TABLE files;
DROP TABLE manifest_layers;
DROP TABLE layers;
DROP TABLE image_manifests;
DROP TABLE images;
