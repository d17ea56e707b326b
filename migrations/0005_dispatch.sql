-- Dispatch in batches (common/src/dispatch): readiness has one source of
-- truth, this table, read through partial indexes.
--
-- A set is grantable when it is unclaimed and either ready, or waiting with
-- a retry time that has passed. The control plane's scheduler claims
-- grantable sets for the workers it grants them to (writing the claim's lock
-- id), so nothing in memory duplicates which sets are ready: the in-memory
-- `queued` mark and its index go.

DROP INDEX message_sets_unqueued_idx;
DROP INDEX message_sets_retry_idx;
ALTER TABLE message_sets DROP COLUMN queued;

-- Ready, unclaimed sets of a trigger in arrival order: what the scheduler grants.
CREATE INDEX message_sets_grantable_idx ON message_sets (trigger_id, id)
    WHERE state = 'ready' AND lock_id IS NULL;
-- Unclaimed sets waiting for a retry time, soonest first.
CREATE INDEX message_sets_retry_idx ON message_sets (trigger_id, retry_at)
    WHERE state = 'waiting' AND retry_at IS NOT NULL AND lock_id IS NULL;

-- The head query probes work orders by their whole unique key (trigger,
-- topic, partition, offset). An index led by trigger_id let a planner with
-- stale statistics probe by trigger alone and filter every work order of
-- the trigger, which made dispatch cost grow with the trigger's history;
-- led by state, the listing index cannot be taken for that probe.
DROP INDEX work_orders_trigger_state_idx;
CREATE INDEX work_orders_state_trigger_idx ON work_orders (state, trigger_id, id);

-- Work-order ids are now derived from (trigger, topic, partition, offset)
-- (UUID v5, see common/src/dispatch/ids.rs), so a work order re-created after
-- a crash keeps its id. Nothing reads work orders by set.
DROP INDEX work_orders_set_idx;

-- Finished work orders are removed after a retention period, oldest first.
CREATE INDEX work_orders_finished_idx ON work_orders (updated_at)
    WHERE state IN ('success', 'skipped');
