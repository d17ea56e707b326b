-- Ingest: stored Kafka messages, their dedup records, per-partition
-- checkpoints, and the messages that could not be stored.

-- Messages waiting to become (or being) work orders. A message is deleted once
-- its work order succeeded; its dedup record outlives it.
CREATE TABLE messages (
    trigger_id    uuid        NOT NULL REFERENCES triggers (id) ON DELETE CASCADE,
    topic         text        NOT NULL,
    partition     integer     NOT NULL,
    "offset"      bigint      NOT NULL,
    -- Kept byte for byte: keys need not be UTF-8, values need not be JSON.
    key           bytea,
    value         bytea,
    -- Kafka headers in order, as two parallel arrays: names are strings in
    -- the Kafka protocol, values are arbitrary bytes or null.
    header_names  text[]      NOT NULL DEFAULT '{}',
    header_values bytea[]     NOT NULL DEFAULT '{}',
    -- The Kafka message timestamp (create or log-append time), if any.
    ts            timestamptz,
    ingested_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (trigger_id, topic, partition, "offset"),
    CONSTRAINT messages_headers_check
        CHECK (cardinality(header_names) = cardinality(header_values))
);

-- Message candidate sets: the messages of one (trigger, topic, key) in order;
-- the candidate is the first row of a set in this index.
CREATE INDEX messages_set_idx ON messages (trigger_id, topic, key, partition, "offset");

-- Dedup records: one per (trigger, topic, partition, offset) ever ingested,
-- kept for a retention period after the message itself is gone so that a
-- redelivered message is recognised. No foreign key to `triggers`: the
-- retention cleanup removes the records of deleted triggers too, and a
-- per-row foreign key check would only slow ingest down.
CREATE TABLE message_records (
    trigger_id uuid        NOT NULL,
    topic      text        NOT NULL,
    partition  integer     NOT NULL,
    "offset"   bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (trigger_id, topic, partition, "offset")
);

CREATE INDEX message_records_created_at_idx ON message_records (created_at);

-- The last offset and timestamp seen per partition. Its own table (not a
-- column of `triggers`) so that ingest never locks the trigger row; rows are
-- only moved forward (GREATEST) in the batch's transaction.
CREATE TABLE partition_checkpoints (
    trigger_id  uuid        NOT NULL REFERENCES triggers (id) ON DELETE CASCADE,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    last_offset bigint      NOT NULL,
    last_ts     timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (trigger_id, topic, partition)
);

-- Messages that could not be stored (e.g. a row the database rejects). Their
-- offsets are committed like the others so one bad message does not block a
-- partition; operators list them here instead of losing them silently.
CREATE TABLE ingest_failures (
    id            bigserial   PRIMARY KEY,
    trigger_id    uuid        NOT NULL REFERENCES triggers (id) ON DELETE CASCADE,
    topic         text        NOT NULL,
    partition     integer     NOT NULL,
    "offset"      bigint      NOT NULL,
    key           bytea,
    value         bytea,
    -- Null when the headers themselves could not be read.
    header_names  text[],
    header_values bytea[],
    ts            timestamptz,
    error         text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ingest_failures_trigger_id_idx ON ingest_failures (trigger_id, id);
