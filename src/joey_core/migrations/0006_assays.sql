-- Assays: stored definitions and one result per window (see docs/assays.md).
CREATE TABLE assays (
    id           bigserial PRIMARY KEY,
    workspace_id bigint NOT NULL REFERENCES workspaces(id),
    name         text NOT NULL,
    pipeline     text NOT NULL,
    definition   jsonb NOT NULL,   -- the definition with defaults filled in and the baseline summary
    active       boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, name)
);

-- The unique key makes a window's result final: a restarted or second assayer that scores the
-- same window again inserts nothing (ON CONFLICT DO NOTHING).
CREATE TABLE assay_results (
    id           bigserial PRIMARY KEY,
    assay_id     bigint NOT NULL REFERENCES assays(id) ON DELETE CASCADE,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    score        double precision NOT NULL,
    scores       jsonb NOT NULL,
    bin_index    int,
    status       text NOT NULL,
    summaries    jsonb NOT NULL,   -- {"baseline": Summary, "window": Summary}
    published    boolean NOT NULL DEFAULT false,  -- sent to joey.assays.results (and alerts)
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (assay_id, window_start)
);
CREATE INDEX assay_results_unpublished ON assay_results (assay_id) WHERE NOT published;
