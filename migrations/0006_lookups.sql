-- Operator look-ups by key (ListMessageSets and ListWorkOrders key filters),
-- in id order, the listings' order and page token. Only keyed rows: an
-- unkeyed set or work order has no key to look up.
--
-- A key has one set per (trigger, topic), so a key filter reads a handful
-- of index rows whatever the number of keys; the key's work orders are its
-- history, walked a page at a time. The offset-range filter of
-- ListWorkOrders needs no index of its own: it reads the unique key
-- work_orders_message_key (trigger_id, topic, partition, offset).
CREATE INDEX message_sets_key_idx ON message_sets (key, id) WHERE key IS NOT NULL;
CREATE INDEX work_orders_key_idx ON work_orders (key, id) WHERE key IS NOT NULL;
