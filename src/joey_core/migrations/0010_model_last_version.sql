-- The highest version a model ever had: deleting model versions never makes a number come back,
-- so "iris v3" in a log or a pipeline version always means one artifact.
ALTER TABLE models ADD COLUMN last_version bigint NOT NULL DEFAULT 0;
UPDATE models m SET last_version = coalesce((SELECT max(version) FROM model_versions v WHERE v.model_id = m.id), 0);
