-- CDR log-probs, prompt routing, scorer details, and evaluations against labelled pairs.

ALTER TABLE scores ADD COLUMN details VARCHAR;  -- JSON of scorer-specific values

-- log p(continuation | context) under one model, keyed by model and both texts' hashes: adding a
-- weak model or a curation rule reuses every pass already made.
CREATE TABLE logprobs (
    lp_id VARCHAR PRIMARY KEY,
    model VARCHAR NOT NULL,
    context_hash VARCHAR NOT NULL,
    continuation_hash VARCHAR NOT NULL,
    logprob DOUBLE NOT NULL,
    tokens INTEGER NOT NULL,
    call_ids VARCHAR[] NOT NULL,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE prompt_routes (
    route_id VARCHAR PRIMARY KEY,      -- H(router identity, prompt_id, domains)
    prompt_id VARCHAR NOT NULL,
    router VARCHAR NOT NULL,
    domain VARCHAR NOT NULL,
    parsed BOOLEAN NOT NULL,           -- false: the default domain was used
    raw VARCHAR NOT NULL,
    call_id VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- `prefsynth eval`: one row per (evaluation, scorer), and each labelled pair's two scores.
CREATE TABLE evals (
    eval_id VARCHAR NOT NULL,
    scorer_id VARCHAR NOT NULL,
    scorer VARCHAR NOT NULL,
    data VARCHAR NOT NULL,
    format VARCHAR NOT NULL,
    n INTEGER NOT NULL,
    accuracy DOUBLE NOT NULL,
    ties INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    report VARCHAR NOT NULL,           -- JSON: the whole report, by subset included
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (eval_id, scorer_id)
);

CREATE TABLE eval_items (
    eval_id VARCHAR NOT NULL,
    scorer_id VARCHAR NOT NULL,
    pair_key VARCHAR NOT NULL,
    subset VARCHAR NOT NULL,
    source_ref VARCHAR NOT NULL,
    score_better DOUBLE,
    score_worse DOUBLE,
    error VARCHAR,
    PRIMARY KEY (eval_id, scorer_id, pair_key)
);
