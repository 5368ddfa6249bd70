-- Starlight index, version 4: predicted traces.
--
-- At conversion the registry predicts the files a container of the image
-- reads first (package registry-ext/predict) and stores the prediction as
-- a trace marked predicted. The merged priority of a manifest comes from
-- its real traces only, and from its latest prediction while it has none:
-- a prediction orders the bundles of an image nobody has run, and the
-- first real trace replaces it (docs/TRACES.md, "Predicted traces").

-- +goose Up
ALTER TABLE traces ADD COLUMN predicted INTEGER NOT NULL DEFAULT 0;
-- 1 while the manifest's priority in trace_priority is a prediction. Such
-- a priority is neither inherited by the next version of the image nor
-- shared with other manifests.
ALTER TABLE trace_manifests ADD COLUMN predicted INTEGER NOT NULL DEFAULT 0;

-- +goose Down
ALTER TABLE trace_manifests DROP COLUMN predicted;
ALTER TABLE traces DROP COLUMN predicted;
