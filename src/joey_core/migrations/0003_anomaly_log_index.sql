-- Anomalies are a small share of the log: a partial index lets anomalies-only pages skip the rest.
CREATE INDEX inference_logs_anomalies ON inference_logs (workspace, pipeline, time, id)
    WHERE jsonb_array_length(check_failures) > 0;
