-- Ordering modes (Trigger.ordering, stored in the spec). A trigger ordered
-- by partition keeps one set per (trigger, topic, partition): a third set
-- identity, with key and offset NULL. An unordered trigger gives every
-- message a set of its own, the identity unkeyed messages already have.
ALTER TABLE message_sets DROP CONSTRAINT message_sets_identity_check;
-- NOT VALID, then validated: the check of existing rows does not block
-- writes to the table.
ALTER TABLE message_sets ADD CONSTRAINT message_sets_identity_check CHECK (
    (key IS NOT NULL AND partition IS NULL AND "offset" IS NULL)
    OR (key IS NULL AND partition IS NOT NULL)) NOT VALID;
ALTER TABLE message_sets VALIDATE CONSTRAINT message_sets_identity_check;

CREATE UNIQUE INDEX message_sets_partition_idx ON message_sets (trigger_id, topic, partition)
    WHERE key IS NULL AND "offset" IS NULL;
