-- Every export is an immutable snapshot: which rows (pairs, or anchors for `sft`), the content hashes of the
-- exported file and its card, and the rows per source; `prefsynth export --snapshot ID` writes it again.
ALTER TABLE dataset_snapshots ADD COLUMN IF NOT EXISTS file_sha256 VARCHAR;
ALTER TABLE dataset_snapshots ADD COLUMN IF NOT EXISTS card_sha256 VARCHAR;
ALTER TABLE dataset_snapshots ADD COLUMN IF NOT EXISTS counts VARCHAR;   -- JSON: rows per source

CREATE TABLE IF NOT EXISTS snapshot_rows (
    snapshot_id VARCHAR NOT NULL,
    row_id VARCHAR NOT NULL,            -- a pair_id, or a response_id for `sft`
    PRIMARY KEY (snapshot_id, row_id)
);
