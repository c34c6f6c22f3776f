-- How the engine runs each model version (ModelConfig as JSON: only the fields set); '{}' is the
-- engine's own settings.
ALTER TABLE model_versions ADD COLUMN config jsonb NOT NULL DEFAULT '{}';
