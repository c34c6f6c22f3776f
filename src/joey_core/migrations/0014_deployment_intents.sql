-- A change of a pipeline's deployment on its way to joey.deployments. Committed before the publish and
-- deleted in the transaction that records the change once the broker acknowledged it, so a row left
-- behind (the registry died between the two, the publish failed or timed out, or Postgres refused the
-- commit) means Kafka may say something Postgres does not: the registry then re-publishes what
-- Postgres holds for that pipeline (its deployment's spec, or a tombstone) and deletes the row.
-- Keyed by names, as joey.deployments is: the pipeline may be gone by the time it is reconciled.
CREATE TABLE deployment_intents (
    workspace     text NOT NULL,
    pipeline      text NOT NULL,
    deployment_id text,              -- the deployment being published; NULL for an undeploy
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, pipeline)
);
