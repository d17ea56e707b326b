-- Dead letters: messages whose work order failed for good under a trigger
-- with `on_failure = DEAD_LETTER`. The message is moved here (its bytes, its
-- work order's attempts and last error) in the transaction that records the
-- failure, and its key moves on to its next message. ReplayDeadLetter moves
-- it back into `messages`; DeleteDeadLetter drops it.

CREATE TABLE dead_letters (
    -- UUID v7, assigned by the worker that recorded it.
    id                 uuid        PRIMARY KEY,
    trigger_id         uuid        NOT NULL REFERENCES triggers (id) ON DELETE CASCADE,
    topic              text        NOT NULL,
    partition          integer     NOT NULL,
    "offset"           bigint      NOT NULL,
    -- The message, byte for byte, as it was stored (see `messages`).
    key                bytea,
    value              bytea,
    header_names       text[]      NOT NULL DEFAULT '{}',
    header_values      bytea[]     NOT NULL DEFAULT '{}',
    ts                 timestamptz,
    -- The work order that failed (kept in `work_orders` as `failed`), with a
    -- copy of its attempts: the work order's row is its live record, this is
    -- the record of what made the message a dead letter.
    work_order_id      uuid        NOT NULL,
    attempts           integer     NOT NULL,
    attempt_log        jsonb       NOT NULL,
    last_error         text,
    -- Where the message was also produced (`dead_letter_topic`), if it was;
    -- the produce was acknowledged before this row was committed.
    produced_topic     text,
    produced_partition integer,
    produced_offset    bigint,
    created_at         timestamptz NOT NULL DEFAULT now(),
    -- A message is a dead letter at most once at a time: a replay removes
    -- the row, a later failure records it again.
    CONSTRAINT dead_letters_message_key UNIQUE (trigger_id, topic, partition, "offset"),
    CONSTRAINT dead_letters_headers_check CHECK (cardinality(header_names) = cardinality(header_values))
);

-- ListDeadLetters by trigger, in id (time) order, the listing's page token.
CREATE INDEX dead_letters_trigger_idx ON dead_letters (trigger_id, id);
