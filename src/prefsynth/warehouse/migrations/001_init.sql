-- Fact tables are append-only: rows are keyed by content-addressed ids and inserted with
-- ON CONFLICT DO NOTHING. Every row carries the run that first produced it and when.

CREATE TABLE runs (
    run_id VARCHAR PRIMARY KEY,
    name VARCHAR NOT NULL,
    config VARCHAR NOT NULL,           -- canonical JSON of the validated config
    flow_run_id VARCHAR,
    started_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- Runs end by appending here: a run without a row was interrupted.
CREATE TABLE run_ends (
    run_id VARCHAR PRIMARY KEY,
    status VARCHAR NOT NULL,           -- completed | failed
    summary VARCHAR NOT NULL,          -- JSON of the final counts
    finished_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE prompts (
    prompt_id VARCHAR PRIMARY KEY,
    messages VARCHAR NOT NULL,         -- JSON list of {role, content}
    source VARCHAR NOT NULL,
    source_ref VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- Which prompts a run used (a rerun reuses rows it did not create).
CREATE TABLE run_prompts (
    run_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    PRIMARY KEY (run_id, prompt_id)
);

CREATE TABLE model_calls (
    attempt_id VARCHAR PRIMARY KEY,
    call_id VARCHAR NOT NULL,          -- H(model identity, canonical request body)
    model VARCHAR NOT NULL,
    endpoint VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    request VARCHAR NOT NULL,
    response VARCHAR,
    status VARCHAR NOT NULL,           -- ok | error
    error VARCHAR,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    latency_ms DOUBLE NOT NULL,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE INDEX model_calls_call_id ON model_calls (call_id);

CREATE TABLE responses (
    response_id VARCHAR PRIMARY KEY,   -- H(prompt_id, model identity, sampling, sample index)
    prompt_id VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    model_identity VARCHAR NOT NULL,
    sampling VARCHAR NOT NULL,
    sample_index INTEGER NOT NULL,
    seed BIGINT NOT NULL,
    text VARCHAR NOT NULL,
    finish_reason VARCHAR,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    latency_ms DOUBLE NOT NULL,
    call_id VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE scorers (
    scorer_id VARCHAR PRIMARY KEY,     -- H(scorer config)
    name VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    config VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE scores (
    score_id VARCHAR PRIMARY KEY,      -- H(response_id, scorer_id)
    response_id VARCHAR NOT NULL,
    scorer_id VARCHAR NOT NULL,
    scorer VARCHAR NOT NULL,
    value DOUBLE NOT NULL,
    rationale VARCHAR,
    raw VARCHAR NOT NULL,
    call_ids VARCHAR[] NOT NULL,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- Items a stage could not finish (HTTP errors, unparsable judgments): one row per attempt.
CREATE TABLE failures (
    run_id VARCHAR NOT NULL,
    stage VARCHAR NOT NULL,
    item_id VARCHAR NOT NULL,
    scorer_id VARCHAR,
    error VARCHAR NOT NULL,
    raw VARCHAR,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE pairs (
    pair_id VARCHAR PRIMARY KEY,       -- H(chosen, rejected, rule)
    prompt_id VARCHAR NOT NULL,
    chosen_id VARCHAR NOT NULL,
    rejected_id VARCHAR NOT NULL,
    scorer_id VARCHAR NOT NULL,
    rule VARCHAR NOT NULL,
    score_chosen DOUBLE NOT NULL,
    score_rejected DOUBLE NOT NULL,
    margin DOUBLE NOT NULL,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE run_pairs (
    run_id VARCHAR NOT NULL,
    pair_id VARCHAR NOT NULL,
    PRIMARY KEY (run_id, pair_id)
);

CREATE TABLE dataset_snapshots (
    snapshot_id VARCHAR PRIMARY KEY,   -- H(pair ids, format)
    run_id VARCHAR,                    -- the run whose pairs were exported
    format VARCHAR NOT NULL,
    path VARCHAR NOT NULL,
    n_pairs INTEGER NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- The newest run that finished, and the pairs it selected: what `prefsynth export` writes.
CREATE VIEW v_latest_run AS
SELECT r.run_id, r.name, r.started_at, e.finished_at
FROM runs r JOIN run_ends e USING (run_id)
WHERE e.status = 'completed'
ORDER BY e.finished_at DESC, r.run_id
LIMIT 1;

-- Every run's pairs with their prompt and response texts.
CREATE VIEW v_run_pairs AS
SELECT rp.run_id, p.pair_id, p.prompt_id, pr.messages AS prompt_messages,
       c.text AS chosen_text, r.text AS rejected_text,
       p.score_chosen, p.score_rejected, p.margin,
       p.chosen_id, p.rejected_id, c.model AS chosen_model, r.model AS rejected_model,
       p.scorer_id, p.rule
FROM run_pairs rp
JOIN pairs p USING (pair_id)
JOIN prompts pr ON pr.prompt_id = p.prompt_id
JOIN responses c ON c.response_id = p.chosen_id
JOIN responses r ON r.response_id = p.rejected_id;

CREATE VIEW v_pairs_export AS
SELECT * FROM v_run_pairs WHERE run_id = (SELECT run_id FROM v_latest_run);

-- One row per response, with each scorer's value in a map keyed by scorer name.
CREATE VIEW v_scores_wide AS
SELECT s.response_id, any_value(r.prompt_id) AS prompt_id, any_value(r.model) AS model,
       map_from_entries(list((s.scorer, s.value) ORDER BY s.scorer)) AS scores
FROM scores s JOIN responses r USING (response_id)
GROUP BY s.response_id;

CREATE VIEW v_model_costs AS
SELECT run_id, model, kind,
       count(*) AS calls,
       count(*) FILTER (WHERE status = 'error') AS errors,
       sum(prompt_tokens) AS prompt_tokens,
       sum(completion_tokens) AS completion_tokens,
       avg(latency_ms) AS mean_latency_ms
FROM model_calls
GROUP BY ALL;
