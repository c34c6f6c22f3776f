-- Native models (sklearn, xgboost, lightgbm, pytorch) converted to ONNX by the registry (docs/models.md).
-- sha256/size_bytes stay the artifact engines serve (the ONNX form, '' while converting); the file as
-- uploaded is kept beside it, content-addressed too. Rows before this are ready ONNX or python steps.
ALTER TABLE model_versions
    ADD COLUMN status            text NOT NULL DEFAULT 'ready',  -- ready | converting | error
    ADD COLUMN conversion_log    text NOT NULL DEFAULT '',
    ADD COLUMN source_sha256     text,
    ADD COLUMN source_size_bytes bigint;
CREATE INDEX model_versions_source_sha256 ON model_versions (source_sha256) WHERE source_sha256 IS NOT NULL;
