-- The event stream reads events in commit-safe order. Ids come from a
-- sequence, so a transaction can commit an event with a lower id after a
-- reader has moved past it; ordering by (transaction id, id) and reading only
-- transactions older than the oldest one still running
-- (pg_snapshot_xmin(pg_current_snapshot())) closes that gap: every later
-- commit has a larger transaction id than anything already read.

ALTER TABLE events ADD COLUMN tx_id xid8 NOT NULL DEFAULT pg_current_xact_id();

CREATE INDEX events_stream_idx ON events (tx_id, id);

-- Wakes the control plane's event tail when events commit.
CREATE FUNCTION kt_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kt_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION kt_events_notify();
