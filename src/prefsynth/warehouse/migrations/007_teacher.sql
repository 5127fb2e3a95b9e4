-- Teachers (issue 11). A response the pipeline did not sample says where it came from: `sampled` (a policy's
-- sample), `teacher_refinement` (a teacher's minimal edit of a sampled response), `teacher_anchor` (the
-- teacher's own answer). A refinement's lineage and calibrated scores are in `refinements`. Idempotent.
ALTER TABLE responses ADD COLUMN IF NOT EXISTS source VARCHAR DEFAULT 'sampled';

CREATE TABLE IF NOT EXISTS refinements (
    refinement_id VARCHAR PRIMARY KEY,  -- H(refined response, parent score and its source, min_gap)
    prompt_id VARCHAR NOT NULL,
    response_id VARCHAR NOT NULL,       -- the refinement y*_w (responses.source = 'teacher_refinement')
    parent_id VARCHAR NOT NULL,         -- the sampled response y_l it edits
    teacher VARCHAR NOT NULL,           -- teacher model identity
    edit_kind VARCHAR NOT NULL,
    explanation VARCHAR NOT NULL,
    edit_distance INTEGER NOT NULL,     -- Levenshtein distance in characters, parent -> refinement
    score_parent DOUBLE NOT NULL,       -- s_l, 1..10
    parent_scored_by VARCHAR NOT NULL,  -- scorer:<name> | teacher
    score_refined DOUBLE,               -- s_w, 1..10, the teacher's calibrated score (NULL: not scored)
    margin DOUBLE,                      -- s_w - s_l
    kept BOOLEAN NOT NULL,
    drop_reason VARCHAR,                -- identical | below_min_gap
    reference_id VARCHAR,               -- the teacher's anchor shown as a reference
    call_ids VARCHAR[] NOT NULL,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE INDEX IF NOT EXISTS refinements_parent ON refinements (parent_id);
