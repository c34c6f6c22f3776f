-- The highest version a model ever had: deleting model versions never makes a number come back,
-- so "iris v3" in a log or a pipeline version always means one artifact.
ALTER TABLE models ADD COLUMN last_version bigint NOT NULL DEFAULT 0;
UPDATE models m SET last_version = coalesce((SELECT max(version) FROM model_versions v WHERE v.model_id = m.id), 0);

-- Deployments of deleted pipelines. Their replicas' log records may still be on their way (the
-- logger runs behind, and replays after a crash): the logger drops them instead of giving them to a
-- new pipeline of the same name.
CREATE TABLE deleted_deployments (
    deployment_id text PRIMARY KEY,
    deleted_at    timestamptz NOT NULL DEFAULT now()
);
