-- Replicas (issue 15): on an endpoint with several replicas (`base_urls`), `endpoint` is the replica that
-- answered the call (or failed its last attempt) and `failed_on` lists the replica of each failed HTTP attempt
-- ([] when none failed). NULL for calls to one server and for rows recorded before this migration. Idempotent.
ALTER TABLE model_calls ADD COLUMN IF NOT EXISTS failed_on VARCHAR[];

-- Per run, model and replica: calls it answered, calls that failed there, and failed HTTP attempts on it.
CREATE OR REPLACE VIEW v_replicas AS
WITH calls AS (
    SELECT run_id, model, endpoint, status, failed_on FROM model_calls WHERE failed_on IS NOT NULL
), served AS (
    SELECT run_id, model, endpoint AS replica,
           count(*) FILTER (WHERE status = 'ok') AS answered,
           count(*) FILTER (WHERE status = 'error') AS failed_calls
    FROM calls GROUP BY ALL
), failed AS (
    SELECT run_id, model, replica, count(*) AS failed_requests
    FROM (SELECT run_id, model, unnest(failed_on) AS replica FROM calls)
    GROUP BY ALL
)
SELECT run_id, model, replica,
       coalesce(s.answered, 0) AS answered,
       coalesce(s.failed_calls, 0) AS failed_calls,
       coalesce(f.failed_requests, 0) AS failed_requests
FROM served s FULL OUTER JOIN failed f USING (run_id, model, replica);
