-- What each recorded call cost in HTTP requests, and why: the client's retries are visible (issue 13).
-- NULL on rows recorded before this migration (unknown). A cached answer made no request: attempts 0.
-- attempts: HTTP requests sent for this call (1 + retries); rate_limited: answers 429; server_errors: answers
-- 408/409/5xx; timeouts: requests abandoned at timeout_s (the server may still have served, and billed, them);
-- dropped: connections refused or closed without an answer; wait_ms: time slept before retries (Retry-After
-- or backoff); throttle_ms: time waiting on the endpoint's own requests/tokens-per-minute limits and its
-- Prefect global concurrency limit. Idempotent.
ALTER TABLE model_calls ADD COLUMN IF NOT EXISTS attempts INTEGER;
ALTER TABLE model_calls ADD COLUMN IF NOT EXISTS rate_limited INTEGER;
ALTER TABLE model_calls ADD COLUMN IF NOT EXISTS server_errors INTEGER;
ALTER TABLE model_calls ADD COLUMN IF NOT EXISTS timeouts INTEGER;
ALTER TABLE model_calls ADD COLUMN IF NOT EXISTS dropped INTEGER;
ALTER TABLE model_calls ADD COLUMN IF NOT EXISTS wait_ms DOUBLE;
ALTER TABLE model_calls ADD COLUMN IF NOT EXISTS throttle_ms DOUBLE;

-- Per run and endpoint: recorded calls, HTTP requests, retries and what caused them.
CREATE OR REPLACE VIEW v_endpoint_retries AS
SELECT run_id, endpoint, model,
       count(*) AS calls,
       count(*) FILTER (WHERE status = 'error') AS errors,
       sum(attempts) AS requests,
       sum(greatest(attempts - 1, 0)) AS retries,
       sum(rate_limited) AS rate_limited,
       sum(server_errors) AS server_errors,
       sum(timeouts) AS timeouts,
       sum(dropped) AS dropped,
       round(sum(wait_ms) / 1000, 3) AS retry_wait_s,
       round(sum(throttle_ms) / 1000, 3) AS throttle_wait_s
FROM model_calls
GROUP BY ALL;
