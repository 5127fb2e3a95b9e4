-- OpenAI-style batch jobs (`batch: true` on a model): each uploaded request file, the batch created on it,
-- and the calls it carries. A call waits on its batch until model_calls has a result for it recorded after
-- the batch was: a restarted run polls the same batch and never submits a request twice.
CREATE TABLE IF NOT EXISTS batches (
    input_file_id VARCHAR PRIMARY KEY,
    batch_id VARCHAR,                   -- NULL until the batch is created on the file
    model VARCHAR NOT NULL,             -- the model identity (as in model_calls.model)
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS batch_calls (
    input_file_id VARCHAR NOT NULL,
    call_id VARCHAR NOT NULL,
    PRIMARY KEY (input_file_id, call_id)
);
