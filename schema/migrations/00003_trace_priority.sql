-- Starlight index, version 3: merged startup traces.
--
-- Raw traces stay in traces/trace_entries (version 1). Every accepted
-- report recomputes the merged priority of its manifest and materialises
-- it here, so a delta request reads one manifest's ordering with one
-- indexed query instead of merging raw traces on the request path.

-- +goose Up
-- The run a report describes, so that a run reported twice (e.g. a
-- partial trace and later the whole one) is merged once.
ALTER TABLE traces ADD COLUMN container TEXT NOT NULL DEFAULT '';
ALTER TABLE traces ADD COLUMN started_at BIGINT NOT NULL DEFAULT 0; -- unix ms
ALTER TABLE traces ADD COLUMN accesses INTEGER NOT NULL DEFAULT 0;
CREATE INDEX traces_by_repository ON traces (repository, manifest_digest, created_at);

-- One row per traced converted platform manifest of a repository. The row
-- is written first in every ingestion transaction, which serialises
-- concurrent merges of the same manifest on both SQLite and PostgreSQL.
CREATE TABLE trace_manifests (
    repository      TEXT    NOT NULL,
    manifest_digest TEXT    NOT NULL,
    platform        TEXT    NOT NULL, -- os/arch[/variant], for inheritance across versions
    pushed_at       BIGINT  NOT NULL, -- push time of the image, orders versions
    traces          INTEGER NOT NULL DEFAULT 0,
    items           INTEGER NOT NULL DEFAULT 0, -- rows in trace_priority
    updated_at      BIGINT  NOT NULL,
    PRIMARY KEY (repository, manifest_digest)
);
CREATE INDEX trace_manifests_by_platform ON trace_manifests (repository, platform, pushed_at);

-- The merged priority of a manifest: traced (layer, file, chunk) in the
-- order their contents should travel, position 0 first.
CREATE TABLE trace_priority (
    repository      TEXT    NOT NULL,
    manifest_digest TEXT    NOT NULL,
    position        INTEGER NOT NULL,
    layer_digest    TEXT    NOT NULL,
    name            TEXT    NOT NULL,
    chunk_offset    BIGINT  NOT NULL,
    digest          TEXT    NOT NULL, -- content of the file, from the index
    whole           INTEGER NOT NULL DEFAULT 0, -- 1: a file-level run saw it; the rest of the file follows it
    runs            INTEGER NOT NULL, -- runs that accessed it
    PRIMARY KEY (repository, manifest_digest, position)
);
CREATE INDEX trace_priority_by_digest ON trace_priority (digest);

-- +goose Down
DROP INDEX trace_priority_by_digest;
DROP TABLE trace_priority;
DROP INDEX trace_manifests_by_platform;
DROP TABLE trace_manifests;
DROP INDEX traces_by_repository;
ALTER TABLE traces DROP COLUMN accesses;
ALTER TABLE traces DROP COLUMN started_at;
ALTER TABLE traces DROP COLUMN container;
