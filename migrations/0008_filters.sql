-- Messages a trigger's filter did not match, counted per partition on the
-- checkpoint row the batch transaction already upserts: counting them costs
-- no extra row lock. Only a message seen for the first time (its dedup
-- record is new) is counted, so a redelivered copy is not counted twice.
ALTER TABLE partition_checkpoints ADD COLUMN filtered bigint NOT NULL DEFAULT 0;
