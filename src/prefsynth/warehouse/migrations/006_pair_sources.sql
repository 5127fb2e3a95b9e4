-- Every pair says where it comes from, so a training run can filter or weight by it: `sampled` (a curation
-- rule over sampled responses), `teacher_refinement` (a teacher's minimal edit against its parent),
-- `teacher_anchor` (the teacher's own answer against a sampled one). Idempotent.
ALTER TABLE pairs ADD COLUMN IF NOT EXISTS source VARCHAR DEFAULT 'sampled';

CREATE OR REPLACE VIEW v_run_pairs AS
SELECT rp.run_id, p.pair_id, p.prompt_id, pr.messages AS prompt_messages,
       c.text AS chosen_text, r.text AS rejected_text,
       p.score_chosen, p.score_rejected, p.margin,
       p.chosen_id, p.rejected_id, c.model AS chosen_model, r.model AS rejected_model,
       p.scorer_id, p.rule, p.source
FROM run_pairs rp
JOIN pairs p USING (pair_id)
JOIN prompts pr ON pr.prompt_id = p.prompt_id
JOIN responses c ON c.response_id = p.chosen_id
JOIN responses r ON r.response_id = p.rejected_id;

CREATE OR REPLACE VIEW v_pairs_export AS
SELECT * FROM v_run_pairs WHERE run_id = (SELECT run_id FROM v_latest_run);
