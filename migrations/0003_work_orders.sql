-- Message candidate sets and work orders.
--
-- A keyed set holds the stored messages of one (trigger, topic, key); its
-- candidate is the message with the lowest (partition, offset). Unkeyed
-- messages are each their own set, identified by (partition, offset), so they
-- never wait behind anything. Ingest upserts the set rows in the transaction
-- that stores the messages; the control plane learns of new ready sets from
-- NOTIFY and this table (never by scanning `messages`).

CREATE TABLE message_sets (
    id             bigserial   PRIMARY KEY,
    trigger_id     uuid        NOT NULL REFERENCES triggers (id) ON DELETE CASCADE,
    topic          text        NOT NULL,
    key            bytea,
    -- Only for unkeyed sets: the one message of the set.
    partition      integer,
    "offset"       bigint,
    -- ready:   has a candidate that needs a worker;
    -- idle:    no stored messages (kept so the next message reuses the row);
    -- waiting: the head work order waits for a retry (retry_at) or for an
    --          asynchronous runner (202, CompleteWorkOrder);
    -- blocked: the head work order failed for good; an operator must act.
    state          text        NOT NULL DEFAULT 'ready'
        CHECK (state IN ('ready', 'idle', 'waiting', 'blocked')),
    -- The control plane has taken the set into its in-memory ready queue.
    queued         boolean     NOT NULL DEFAULT false,
    -- Bumped by every ingest batch that adds to the set. A worker marks a set
    -- idle only if this did not change since it looked, so a message that
    -- arrives while the set drains is never stranded.
    ingest_seq     bigint      NOT NULL DEFAULT 0,
    -- The claim of a worker: every write of the claim says `AND lock_id = $n`
    -- (fencing), and an expired claim is released by the janitor.
    lock_id        uuid,
    lock_expires   timestamptz,
    retry_at       timestamptz,
    blocked_since  timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT message_sets_identity_check CHECK (
        (key IS NOT NULL AND partition IS NULL AND "offset" IS NULL)
        OR (key IS NULL AND partition IS NOT NULL AND "offset" IS NOT NULL))
);

CREATE UNIQUE INDEX message_sets_keyed_idx ON message_sets (trigger_id, topic, key) WHERE key IS NOT NULL;
CREATE UNIQUE INDEX message_sets_unkeyed_idx ON message_sets (trigger_id, topic, partition, "offset") WHERE key IS NULL;
-- What the control plane has not queued yet: small, whatever the backlog.
CREATE INDEX message_sets_unqueued_idx ON message_sets (trigger_id, id) WHERE state = 'ready' AND NOT queued;
CREATE INDEX message_sets_state_idx ON message_sets (trigger_id, state, id);
CREATE INDEX message_sets_claims_idx ON message_sets (lock_expires) WHERE lock_id IS NOT NULL;
CREATE INDEX message_sets_retry_idx ON message_sets (retry_at) WHERE state = 'waiting' AND retry_at IS NOT NULL;

-- Exactly one work order per message (the unique constraint), kept after the
-- message is deleted as the record of what was delivered.
CREATE TABLE work_orders (
    id              uuid        PRIMARY KEY,
    trigger_id      uuid        NOT NULL REFERENCES triggers (id) ON DELETE CASCADE,
    set_id          bigint      NOT NULL,
    topic           text        NOT NULL,
    partition       integer     NOT NULL,
    "offset"        bigint      NOT NULL,
    key             bytea,
    state           text        NOT NULL
        CHECK (state IN ('pending', 'running', 'success', 'failed', 'skipped')),
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    -- Every attempt: [{"at": ..., "ms": ..., "status": ..., "error": ...}].
    attempt_log     jsonb       NOT NULL DEFAULT '[]',
    -- The exact JSON POSTed to the target (text, not jsonb: byte for byte).
    body            text        NOT NULL,
    first_attempt_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT work_orders_message_key UNIQUE (trigger_id, topic, partition, "offset")
);

CREATE INDEX work_orders_trigger_state_idx ON work_orders (trigger_id, state, id);
CREATE INDEX work_orders_set_idx ON work_orders (set_id, created_at);
