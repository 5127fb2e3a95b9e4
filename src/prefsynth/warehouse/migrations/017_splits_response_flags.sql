-- Train/test splits of an export (issue 12): the split of each snapshot row, and the snapshot's splits (JSON:
-- seed, fractions and each split's file, rows and SHA-256), so `export --snapshot` writes every file again.
ALTER TABLE snapshot_rows ADD COLUMN IF NOT EXISTS split VARCHAR;        -- NULL: an export without splits
ALTER TABLE dataset_snapshots ADD COLUMN IF NOT EXISTS splits VARCHAR;   -- NULL: an export without splits

-- Responses that duplicate a response to another prompt (curation.dedup_responses) are listed with the
-- prompt flags: prompt_id is the response's prompt, of_id the response it duplicates (the one that stays).
ALTER TABLE prompt_flags ADD COLUMN IF NOT EXISTS response_id VARCHAR;
