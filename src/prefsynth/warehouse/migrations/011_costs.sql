-- Cost control: each call records the stage that made it and its endpoint's price at call time (per 1M
-- input and output tokens; NULL when the config gives none), and v_model_costs sums tokens and cost per
-- run, stage and model. Calls answered from the cache are not in model_calls, so they cost nothing.
ALTER TABLE model_calls ADD COLUMN IF NOT EXISTS stage VARCHAR;
ALTER TABLE model_calls ADD COLUMN IF NOT EXISTS input_per_mtok DOUBLE;
ALTER TABLE model_calls ADD COLUMN IF NOT EXISTS output_per_mtok DOUBLE;


CREATE OR REPLACE VIEW v_model_costs AS
SELECT run_id, coalesce(stage, '') AS stage, model, kind,
       count(*) AS calls,
       count(*) FILTER (WHERE status = 'error') AS errors,
       coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(completion_tokens), 0) AS completion_tokens,
       coalesce(sum(prompt_tokens), 0) + coalesce(sum(completion_tokens), 0) AS tokens,
       -- NULL when none of the group's calls had a price
       sum((coalesce(prompt_tokens, 0) * input_per_mtok + coalesce(completion_tokens, 0) * output_per_mtok) / 1e6)
           AS cost,
       avg(latency_ms) AS mean_latency_ms
FROM model_calls
GROUP BY ALL;
