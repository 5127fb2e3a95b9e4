-- Prompts a run's curation left out, and why: a duplicate of another prompt (exact after normalization, or
-- near by MinHash), or found in a user-given evaluation set (contamination, with the matching item).
CREATE TABLE IF NOT EXISTS prompt_flags (
    prompt_id VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,              -- exact_duplicate | near_duplicate | contaminated
    of_id VARCHAR,                      -- the prompt it duplicates (the one that stays)
    benchmark VARCHAR,
    item VARCHAR,
    similarity DOUBLE,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);
