-- Registry metadata and the inference log.
CREATE TABLE workspaces (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO workspaces (name) VALUES ('default');

CREATE TABLE models (
    id           bigserial PRIMARY KEY,
    workspace_id bigint NOT NULL REFERENCES workspaces(id),
    name         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, name)
);

CREATE TABLE model_versions (
    id          bigserial PRIMARY KEY,
    model_id    bigint NOT NULL REFERENCES models(id),
    version     bigint NOT NULL,
    sha256      text NOT NULL,
    size_bytes  bigint NOT NULL,
    framework   text NOT NULL,
    inputs      jsonb NOT NULL,   -- [{name, dtype, shape}]
    outputs     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (model_id, version)
);
CREATE INDEX model_versions_sha256 ON model_versions (sha256);

CREATE TABLE pipelines (
    id           bigserial PRIMARY KEY,
    workspace_id bigint NOT NULL REFERENCES workspaces(id),
    name         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, name)
);

CREATE TABLE pipeline_versions (
    id          bigserial PRIMARY KEY,
    pipeline_id bigint NOT NULL REFERENCES pipelines(id),
    version     bigint NOT NULL,
    steps       jsonb NOT NULL,   -- resolved steps: [{model, version, sha256, framework, inputs, outputs}]
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (pipeline_id, version)
);

CREATE TABLE deployments (
    pipeline_id         bigint PRIMARY KEY REFERENCES pipelines(id),
    pipeline_version_id bigint NOT NULL REFERENCES pipeline_versions(id),
    replicas            int NOT NULL,
    active              boolean NOT NULL,
    deployment_id       text NOT NULL,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- One row per inference. The unique key is the identity of the input record, so a
-- replayed log record or a re-processed input never makes a second row.
CREATE TABLE inference_logs (
    id               bigserial PRIMARY KEY,
    workspace        text NOT NULL,
    pipeline         text NOT NULL,
    pipeline_version bigint NOT NULL,
    deployment_id    text NOT NULL,
    request_id       text NOT NULL,
    record_key       bytea,
    time             timestamptz NOT NULL,
    input_topic      text NOT NULL,
    input_partition  int NOT NULL,
    input_offset     bigint NOT NULL,
    ok               boolean NOT NULL,
    error            text,
    inputs           jsonb,
    raw_input        bytea,
    outputs          jsonb,
    shadow_outputs   jsonb,
    check_failures   jsonb NOT NULL DEFAULT '[]',
    models           jsonb NOT NULL DEFAULT '[]',
    elapsed_ns       jsonb NOT NULL DEFAULT '[]',
    logged_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace, pipeline, request_id, input_partition, input_offset)
);
CREATE INDEX inference_logs_by_time ON inference_logs (workspace, pipeline, time DESC);
