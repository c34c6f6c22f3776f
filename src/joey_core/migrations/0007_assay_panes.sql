-- Live assays keep the counts of their open windows here (see docs/assays.md, "Live assays"),
-- by pane: windows are unions of panes (the gcd of width and interval), so a log row is counted
-- in one pane however much windows overlap. The loggers add every newly stored log row to its
-- pane in the transaction that stores it, so each inference is counted once whatever Kafka replays.
CREATE TABLE assay_panes (
    assay_id     bigint NOT NULL REFERENCES assays(id) ON DELETE CASCADE,
    pane_start   timestamptz NOT NULL,
    counts       bytea NOT NULL,   -- joey_core.assays.streaming.WindowCounts.to_bytes()
    PRIMARY KEY (assay_id, pane_start)
);
-- Rewritten by every logger batch; its floats barely compress, so do not try (saves CPU per write).
ALTER TABLE assay_panes ALTER COLUMN counts SET STORAGE EXTERNAL;

-- Log rows stored before an assay existed (id <= backfill_until) are counted once by the
-- assayer, which then clears this; rows stored after are counted by the loggers.
ALTER TABLE assays ADD COLUMN backfill_until bigint;
UPDATE assays SET backfill_until = (SELECT coalesce(max(id), 0) FROM inference_logs);
