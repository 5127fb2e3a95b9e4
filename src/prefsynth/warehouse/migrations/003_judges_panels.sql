-- Pairwise judgments, combined comparisons, panels with agreement, and per-scorer diagnostics.

-- Every pairwise judge call that parsed: the order shown, the verdict as given, what it means.
CREATE TABLE judgments (
    judgment_id VARCHAR PRIMARY KEY,   -- H(comparison_id, order, sample)
    comparison_id VARCHAR NOT NULL,
    scorer_id VARCHAR NOT NULL,
    "order" VARCHAR NOT NULL,          -- ab: response a shown first as "A"; ba: b shown first
    sample INTEGER NOT NULL,           -- 0..k-1 (Multiple Evidence Calibration)
    verdict VARCHAR NOT NULL,          -- as answered: A | B | tie (positions)
    preferred VARCHAR NOT NULL,        -- a | b | tie (responses)
    rationale VARCHAR,
    raw VARCHAR NOT NULL,
    repaired BOOLEAN NOT NULL,         -- true: parsed only after the repair prompt
    call_ids VARCHAR[] NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE INDEX judgments_comparison ON judgments (comparison_id);

-- A pair of responses judged by a pairwise scorer, all its judgments combined.
CREATE TABLE comparisons (
    comparison_id VARCHAR PRIMARY KEY, -- H(scorer_id, response a, response b)
    scorer_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    response_a_id VARCHAR NOT NULL,
    response_b_id VARCHAR NOT NULL,
    winner VARCHAR,                    -- a | b | tie; NULL: flipped and dropped (on_flip = drop)
    score_a DOUBLE NOT NULL,           -- a's share of the judgments (b's is 1 - score_a)
    consistent BOOLEAN,                -- same majority verdict in both orders (NULL: one order judged)
    flipped BOOLEAN NOT NULL,          -- the verdict reversed with the order
    judgments INTEGER NOT NULL,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- Labelled evaluations of pairwise judges keep the swap diagnostic per pair.
ALTER TABLE eval_items ADD COLUMN consistent BOOLEAN;

-- Panels are derived per run from member scores (no model calls): the aggregate and the agreement.
CREATE TABLE panel_runs (
    run_id VARCHAR NOT NULL,
    panel_id VARCHAR NOT NULL,         -- H(member scorer ids, aggregate rule)
    name VARCHAR NOT NULL,
    aggregate VARCHAR NOT NULL,
    members VARCHAR[] NOT NULL,        -- member scorer names
    prompts INTEGER NOT NULL,
    alpha DOUBLE,                      -- Krippendorff's alpha (interval, z-scored values), all responses
    mean_tau DOUBLE,                   -- mean Kendall tau-b over prompts and member pairs
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (run_id, panel_id)
);

CREATE TABLE panel_scores (
    run_id VARCHAR NOT NULL,
    panel_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    response_id VARCHAR NOT NULL,
    value DOUBLE NOT NULL,
    PRIMARY KEY (run_id, panel_id, response_id)
);

CREATE TABLE panel_agreement (
    run_id VARCHAR NOT NULL,
    panel_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    scorer_a VARCHAR NOT NULL,         -- member name; '*' with scorer_b '*' is the whole panel's alpha
    scorer_b VARCHAR NOT NULL,
    kendall_tau DOUBLE,                -- NULL: undefined (fewer than 2 responses, or all tied)
    alpha DOUBLE,
    PRIMARY KEY (run_id, panel_id, prompt_id, scorer_a, scorer_b)
);

-- Per scorer and run: failure rate, length bias, and position bias of pairwise judges.
CREATE TABLE scorer_diagnostics (
    run_id VARCHAR NOT NULL,
    scorer_id VARCHAR NOT NULL,
    scorer VARCHAR NOT NULL,
    items INTEGER NOT NULL,            -- responses (pointwise) or comparisons (pairwise) in the run
    failed INTEGER NOT NULL,           -- of those, without a score now
    failure_rate DOUBLE,
    length_corr DOUBLE,                -- Spearman correlation of score and response length in tokens
    position_consistency DOUBLE,       -- share of two-order comparisons whose verdict survives the swap
    first_position_rate DOUBLE,        -- share of decisive judgments that chose the response shown first
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (run_id, scorer_id)
);
