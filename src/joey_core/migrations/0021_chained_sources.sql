-- A source of another pipeline's outputs (docs/workloads.md, "Chaining pipelines"): it has no
-- connection, and names the pipeline it follows instead.
ALTER TABLE bridges ADD COLUMN from_pipeline text NOT NULL DEFAULT '';
