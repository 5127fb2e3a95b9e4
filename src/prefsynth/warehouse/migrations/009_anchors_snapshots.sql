-- The teacher's anchors each run used: what `--format sft` exports (a run's own answers, not every
-- teacher's). And the margin mode of each exported snapshot (NULL: exported before this column). Idempotent.
CREATE TABLE IF NOT EXISTS run_anchors (
    response_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (run_id, response_id)
);

ALTER TABLE dataset_snapshots ADD COLUMN IF NOT EXISTS margin VARCHAR;

-- A run's anchors with their prompt: the rows of an SFT export.
CREATE OR REPLACE VIEW v_run_anchors AS
SELECT ra.run_id, ra.prompt_id, pr.messages AS prompt_messages, r.response_id, r.text, r.model,
       r.finish_reason, r.source
FROM run_anchors ra
JOIN prompts pr ON pr.prompt_id = ra.prompt_id
JOIN responses r ON r.response_id = ra.response_id;
