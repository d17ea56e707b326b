-- The event stream reads events in commit-safe order. Ids come from a
-- sequence, so a transaction can commit an event with a lower id after a
-- reader has moved past it; ordering by (transaction id, id) and reading only
-- transactions older than the oldest one still running
-- (pg_snapshot_xmin(pg_current_snapshot())) closes that gap: every later
-- commit has a larger transaction id than anything already read.

ALTER TABLE events ADD COLUMN tx_id xid8 NOT NULL DEFAULT pg_current_xact_id();

CREATE INDEX events_stream_idx ON events (tx_id, id);

-- No NOTIFY trigger on purpose: a transaction that notifies takes a global
-- lock at commit, which would serialize every worker that records an event.
-- The control plane's tail reads the table on a short tick instead.
