-- Human review (issue 12): the doubtful pairs `prefsynth review export` sent to people, and the verdicts
-- `prefsynth review import` brought back (scorer `human`). Both append-only and content-addressed. Idempotent.
CREATE TABLE IF NOT EXISTS review_tasks (
    task_id VARCHAR PRIMARY KEY,        -- H(review_id, pair_id): the id a tool's task or record carries
    review_id VARCHAR NOT NULL,         -- H(run, pairs, criterion, seed, format): one export
    pair_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    left_id VARCHAR NOT NULL,           -- the response shown on the left (first)
    right_id VARCHAR NOT NULL,
    chosen_side VARCHAR NOT NULL,       -- left | right: where the machine's chosen response was shown
    tool VARCHAR NOT NULL,              -- argilla | label-studio
    criterion VARCHAR NOT NULL,         -- agreement | margin | flips | auto
    rank INTEGER NOT NULL,              -- 1: the most doubtful
    doubt VARCHAR NOT NULL,             -- JSON: agreement, z_margin, flips of the pair when exported
    run_id VARCHAR NOT NULL,            -- the run whose pairs were ranked
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS human_labels (
    label_id VARCHAR PRIMARY KEY,       -- H(task, annotator, verdict, labelled_at): a file imported twice adds nothing
    task_id VARCHAR NOT NULL,
    pair_id VARCHAR NOT NULL,
    prompt_id VARCHAR NOT NULL,
    chosen_id VARCHAR NOT NULL,         -- the machine's chosen and rejected responses of the pair
    rejected_id VARCHAR NOT NULL,
    scorer_id VARCHAR NOT NULL,         -- the `human` scorer
    verdict VARCHAR NOT NULL,           -- chosen | rejected (which of the machine's responses the person preferred) | tie | skip
    preferred_id VARCHAR,               -- the preferred response (NULL: tie or skip)
    annotator VARCHAR NOT NULL,         -- the tool's user: label-studio:<email or id>, argilla:<user id>
    labelled_at VARCHAR,                -- as the tool wrote it (Label Studio's created_at; Argilla exports none)
    tool VARCHAR NOT NULL,
    source_file VARCHAR NOT NULL,
    source_sha256 VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,            -- the import (a run of kind `review`)
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);
