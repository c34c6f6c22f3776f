-- Autoscaling and resource hints of a deployment, and the history of deployments for rollback.
ALTER TABLE deployments ADD COLUMN autoscale jsonb;   -- AutoscaleConfig; NULL = fixed replicas
ALTER TABLE deployments ADD COLUMN resources jsonb;   -- ResourceHints; NULL = none given

-- One row per Deploy (not per autoscaling step): which version went live when. Rollback without a
-- version goes to the version of the latest row before the current deployment's that differs from it.
CREATE TABLE deployment_history (
    id                  bigserial PRIMARY KEY,
    pipeline_id         bigint NOT NULL REFERENCES pipelines(id),
    pipeline_version_id bigint NOT NULL REFERENCES pipeline_versions(id),
    deployment_id       text NOT NULL UNIQUE,
    deployed_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deployment_history_by_pipeline ON deployment_history (pipeline_id, id DESC);
