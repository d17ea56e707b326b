-- Trigger configuration and the event log.

CREATE TABLE triggers (
    id                 uuid PRIMARY KEY,
    name               text        NOT NULL,
    enabled            boolean     NOT NULL,
    -- Increases on every change of configuration or enabled flag; pipelines
    -- restart when it changes.
    generation         bigint      NOT NULL,
    -- Immutable once set; duplicated out of `spec` so it can be indexed.
    group_id           text        NOT NULL,
    -- Validated configuration without secrets (common::trigger::TriggerSpec).
    spec               jsonb       NOT NULL,
    -- AES-256-GCM of the secrets (SASL password, TLS client key, secret
    -- headers), nonce first, the trigger id as associated data.
    secrets_ciphertext bytea,
    secrets_key_id     text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT triggers_name_key UNIQUE (name),
    CONSTRAINT triggers_secrets_key_id_check
        CHECK ((secrets_ciphertext IS NULL) = (secrets_key_id IS NULL))
);

-- Everything that happened, for the event stream and audit. `id` is the
-- stream cursor.
CREATE TABLE events (
    id          bigserial   PRIMARY KEY,
    kind        text        NOT NULL,
    trigger_id  uuid,
    node_id     text,
    details     jsonb       NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX events_trigger_id_idx ON events (trigger_id, id);
CREATE INDEX events_created_at_idx ON events (created_at);
