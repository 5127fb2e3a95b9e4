-- A response can have several scores under one scorer name (a pairwise judge's win share against another
-- set of opponents, or a changed config): keep the newest per (response, scorer name) so map keys stay unique.
CREATE OR REPLACE VIEW v_scores_wide AS
WITH latest AS (
    SELECT s.response_id, s.scorer, arg_max(s.value, s.created_at) AS value
    FROM scores s
    GROUP BY s.response_id, s.scorer
)
SELECT l.response_id, any_value(r.prompt_id) AS prompt_id, any_value(r.model) AS model,
       map_from_entries(list((l.scorer, l.value) ORDER BY l.scorer)) AS scores
FROM latest l JOIN responses r USING (response_id)
GROUP BY l.response_id;
