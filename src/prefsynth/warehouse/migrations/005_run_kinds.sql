-- `prefsynth eval` records its run in `runs` too, so that every run_id in the warehouse names a run.
-- Only pipeline runs have pairs: the run to export is the latest completed `synthesize` run. Idempotent.
ALTER TABLE runs ADD COLUMN IF NOT EXISTS kind VARCHAR DEFAULT 'synthesize';  -- synthesize | eval

CREATE OR REPLACE VIEW v_latest_run AS
SELECT r.run_id, r.name, r.started_at, e.finished_at
FROM runs r JOIN run_ends e USING (run_id)
WHERE e.status = 'completed' AND r.kind = 'synthesize'
ORDER BY e.finished_at DESC, r.run_id
LIMIT 1;
