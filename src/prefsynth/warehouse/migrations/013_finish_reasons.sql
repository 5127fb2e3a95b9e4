-- Pairs carry their replies' finish reasons: `length` means a reply was cut off at max_tokens (curation skips
-- those unless allow_truncated), and the export says so for every row.
CREATE OR REPLACE VIEW v_run_pairs AS
SELECT rp.run_id, p.pair_id, p.prompt_id, pr.messages AS prompt_messages,
       c.text AS chosen_text, r.text AS rejected_text,
       p.score_chosen, p.score_rejected, p.margin,
       p.chosen_id, p.rejected_id, c.model AS chosen_model, r.model AS rejected_model,
       p.scorer_id, p.rule, p.source,
       c.finish_reason AS chosen_finish_reason, r.finish_reason AS rejected_finish_reason
FROM run_pairs rp
JOIN pairs p USING (pair_id)
JOIN prompts pr ON pr.prompt_id = p.prompt_id
JOIN responses c ON c.response_id = p.chosen_id
JOIN responses r ON r.response_id = p.rejected_id;

CREATE OR REPLACE VIEW v_pairs_export AS
SELECT * FROM v_run_pairs WHERE run_id = (SELECT run_id FROM v_latest_run);

-- The share of sampled replies cut off at max_tokens, per model: when it is high, max_tokens is too small.
CREATE OR REPLACE VIEW v_truncation AS
SELECT model, count(*) AS responses,
       count(*) FILTER (WHERE finish_reason = 'length') AS truncated,
       (count(*) FILTER (WHERE finish_reason = 'length') / count(*))::DOUBLE AS truncated_share
FROM responses WHERE source = 'sampled'
GROUP BY model;
