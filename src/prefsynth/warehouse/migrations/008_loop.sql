-- The synthesis loop (issue 11, Anyprefer style). Prompts are data: every version of the target's system
-- prompt and of the judge's rubric, each round with the versions it ran and its acceptance rate, and the
-- pair-quality check of each pair of a round (the pairs themselves stay in `pairs`, source `sampled`).
CREATE TABLE IF NOT EXISTS prompt_versions (
    version_id VARCHAR PRIMARY KEY,     -- H(role, text)
    role VARCHAR NOT NULL,              -- target | judge
    text VARCHAR NOT NULL,
    parent_id VARCHAR,                  -- the version it was rewritten from (NULL: the config's)
    loop_id VARCHAR NOT NULL,
    round INTEGER NOT NULL,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS loop_rounds (
    round_id VARCHAR PRIMARY KEY,       -- H(loop_id, round)
    loop_id VARCHAR NOT NULL,
    round INTEGER NOT NULL,
    target_version VARCHAR NOT NULL,
    judge_version VARCHAR NOT NULL,
    pipeline_run_id VARCHAR NOT NULL,
    pairs INTEGER NOT NULL,
    accepted INTEGER NOT NULL,
    acceptance_rate DOUBLE,
    stop_reason VARCHAR,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS loop_pairs (
    check_id VARCHAR PRIMARY KEY,       -- H(round_id, pair_id)
    round_id VARCHAR NOT NULL,
    pair_id VARCHAR NOT NULL,
    score DOUBLE,
    rationale VARCHAR,
    accepted BOOLEAN NOT NULL,
    error VARCHAR,
    call_ids VARCHAR[] NOT NULL,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- Which prompt versions worked: each version's rounds, pairs, accepted pairs and acceptance rate.
CREATE OR REPLACE VIEW v_prompt_versions AS
SELECT v.version_id, v.role, v.round, v.parent_id, v.text,
       count(r.round_id) AS rounds, coalesce(sum(r.pairs), 0)::BIGINT AS pairs,
       coalesce(sum(r.accepted), 0)::BIGINT AS accepted,
       (sum(r.accepted) / nullif(sum(r.pairs), 0))::DOUBLE AS acceptance_rate
FROM prompt_versions v
LEFT JOIN loop_rounds r ON r.target_version = v.version_id OR r.judge_version = v.version_id
GROUP BY ALL;
