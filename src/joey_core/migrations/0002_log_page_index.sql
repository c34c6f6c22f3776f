-- Log pages are ordered by (time, id) in both directions; one index serves both scans.
CREATE INDEX inference_logs_by_time_id ON inference_logs (workspace, pipeline, time, id);
DROP INDEX inference_logs_by_time;
