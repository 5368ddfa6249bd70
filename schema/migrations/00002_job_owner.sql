-- Starlight index, version 2: lease owners for the conversion queue.
--
-- A job's lease now names the registry process holding it, so a process
-- whose lease expired (it hung or crashed and another replica retook the
-- job) cannot complete or fail a job it no longer owns.

-- +goose Up
ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
-- Leasing skips jobs whose image another job is converting right now.
CREATE INDEX jobs_by_image ON jobs (repository, digest, state);
-- ... and jobs of a tag another job of the same tag is converting.
CREATE INDEX jobs_by_tag ON jobs (repository, tag, state);

-- +goose Down
DROP INDEX jobs_by_tag;
DROP INDEX jobs_by_image;
ALTER TABLE jobs DROP COLUMN owner;
