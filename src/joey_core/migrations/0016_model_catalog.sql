-- Lineage of a model version, the extra files it carries, and tags on models and pipelines.
ALTER TABLE model_versions
    ADD COLUMN description text NOT NULL DEFAULT '',
    ADD COLUMN source      text NOT NULL DEFAULT '',
    ADD COLUMN metadata    jsonb NOT NULL DEFAULT '{}';

-- A version's files live in the artifact store by sha256, as its model does: a file is removed once
-- neither a model version nor a version's file refers to it.
CREATE TABLE model_artifacts (
    model_version_id bigint NOT NULL REFERENCES model_versions(id) ON DELETE CASCADE,
    name             text NOT NULL,
    sha256           text NOT NULL,
    size_bytes       bigint NOT NULL,
    PRIMARY KEY (model_version_id, name)
);
CREATE INDEX model_artifacts_sha256 ON model_artifacts (sha256);

CREATE TABLE model_tags (
    model_id bigint NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    tag      text NOT NULL,
    PRIMARY KEY (model_id, tag)
);
CREATE INDEX model_tags_tag ON model_tags (tag);

CREATE TABLE pipeline_tags (
    pipeline_id bigint NOT NULL REFERENCES pipelines(id) ON DELETE CASCADE,
    tag         text NOT NULL,
    PRIMARY KEY (pipeline_id, tag)
);
CREATE INDEX pipeline_tags_tag ON pipeline_tags (tag);
