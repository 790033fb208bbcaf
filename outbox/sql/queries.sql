-- name: insert_event
-- ids come from AUTOINCREMENT: contiguous within one writer's BEGIN IMMEDIATE
INSERT INTO events (type, object, entity_key, occurred_at, data, source_table, op, lsn, xid, created_at, routed, endpoints)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)

-- name: insert_deliveries
-- One delivery per event of ids first..last that goes to the endpoint, among the events
-- whose writer chose their endpoints (routed = 1): by its own list of endpoints, or
-- without one by its type (:types, the types the writer's routes send there).
INSERT INTO deliveries (event_id, endpoint, entity)
SELECT id, :endpoint, object || ':' || coalesce(entity_key, '')
FROM events
WHERE id BETWEEN :first AND :last
  AND routed = 1
  AND CASE WHEN endpoints IS NULL THEN type IN (SELECT value FROM json_each(:types))
           ELSE :endpoint IN (SELECT value FROM json_each(endpoints)) END
ORDER BY id

-- name: register_cursor
-- An endpoint seen for the first time gets the events appended from now on.
INSERT INTO delivery_cursors (endpoint, last_event_id)
VALUES (?, coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0))
ON CONFLICT (endpoint) DO NOTHING

-- name: forget_routes
-- Before a writer states the routes again: every endpoint's (those it no longer names
-- get no further event).
DELETE FROM endpoint_routes

-- name: add_route
INSERT OR IGNORE INTO endpoint_routes (endpoint, type) VALUES (?, ?)

-- name: last_event_id
SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)

-- name: get_checkpoint
SELECT lsn FROM checkpoint WHERE slot = ?

-- name: checkpoint_of
SELECT lsn, updated_at FROM checkpoint WHERE slot = ?

-- name: set_checkpoint
INSERT INTO checkpoint (slot, lsn, updated_at) VALUES (?, ?, ?)
ON CONFLICT (slot) DO UPDATE SET lsn = excluded.lsn, updated_at = excluded.updated_at

-- name: get_shadow
SELECT vals FROM shadow WHERE tbl = ? AND key = ?

-- name: put_shadow
INSERT INTO shadow (tbl, key, vals) VALUES (?, ?, ?)
ON CONFLICT (tbl, key) DO UPDATE SET vals = excluded.vals

-- name: delete_shadow
DELETE FROM shadow WHERE tbl = ? AND key = ?

-- name: list_events
SELECT id, type, occurred_at, data, source_table, op, lsn, xid
FROM events
WHERE id > :after
ORDER BY id
LIMIT :limit

-- name: get_event
SELECT id, type, occurred_at, data, source_table, op, lsn, xid FROM events WHERE id = ?

-- name: event_deliveries
-- Its delivery rows; a delivered one for each first-try success (no row, in a batch of
-- attempt_batches, the cursor past it); and a pending one for each endpoint whose routes take it and whose
-- cursor has not passed it yet.
SELECT d.endpoint, d.status, d.attempts, d.next_attempt_at
FROM endpoints e JOIN deliveries d ON d.endpoint = e.name AND d.event_id = :id
UNION ALL
SELECT b.endpoint, 'delivered', 1, b.attempted_at
FROM attempt_batches b
WHERE b.first_event_id BETWEEN :id - :span AND :id AND b.last_event_id >= :id
  AND EXISTS (SELECT 1 FROM json_each(b.event_ids) WHERE value = :id)
  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.endpoint = b.endpoint AND d.event_id = :id)
  AND :id <= (SELECT c.last_event_id FROM delivery_cursors c WHERE c.endpoint = b.endpoint)
UNION ALL
SELECT c.endpoint, 'pending', 0, 0.0
FROM events e
JOIN delivery_cursors c ON c.last_event_id < e.id
JOIN endpoint_routes r ON r.endpoint = c.endpoint AND r.type = e.type
WHERE e.id = :id AND e.routed = 0
  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.endpoint = c.endpoint AND d.event_id = :id)
ORDER BY 1

-- name: register_endpoint
-- Active, and no state written yet (updated_at 0): any state an operator or a dispatcher
-- wrote, here or on another node, outranks it.
INSERT INTO endpoints (name, updated_at) VALUES (?, 0) ON CONFLICT (name) DO NOTHING

-- name: stats_by_type
SELECT type, count(*) AS n, max(id) AS last_id FROM events GROUP BY type ORDER BY type

-- name: stats_deliveries
-- Deliveries by endpoint and status: the rows; the first-try successes, counted by their
-- batches; and the events past an endpoint's cursor that its routes take and that have
-- no row yet, pending.
SELECT endpoint, status, sum(n) AS n FROM (
    SELECT endpoint, status, count(*) AS n FROM deliveries GROUP BY endpoint, status
    UNION ALL
    SELECT endpoint, 'delivered', sum(count) FROM attempt_batches GROUP BY endpoint
    UNION ALL
    -- (a batch's events past the cursor are being sent again: pending, not delivered)
    SELECT c.endpoint, 'delivered', -count(*)
    FROM delivery_cursors c
    JOIN attempt_batches b
      ON b.endpoint = c.endpoint AND b.first_event_id > c.last_event_id - :span
     AND b.last_event_id > c.last_event_id
    JOIN json_each(b.event_ids) j ON j.value > c.last_event_id
    GROUP BY c.endpoint
    UNION ALL
    SELECT c.endpoint, 'pending', count(*)
    FROM delivery_cursors c
    JOIN events e ON e.id > c.last_event_id AND e.routed = 0
    JOIN endpoint_routes r ON r.endpoint = c.endpoint AND r.type = e.type
    WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.endpoint = c.endpoint AND d.event_id = e.id)
    GROUP BY c.endpoint
)
GROUP BY endpoint, status
ORDER BY endpoint, status

-- name: stats_totals
SELECT count(*) AS events, coalesce(max(id), 0) AS last_id, min(created_at) AS first_at, max(created_at) AS last_at
FROM events

-- name: endpoint_states
SELECT name, state, failures, paused_until FROM endpoints ORDER BY name

-- name: attempt_counts
-- Attempts since :since per endpoint, and how many of them got a 2xx: the logged ones
-- and the batches of first-try successes.
SELECT endpoint, sum(n), sum(ok) FROM (
    SELECT endpoint, count(*) AS n, sum(status BETWEEN 200 AND 299) AS ok
    FROM attempts INDEXED BY attempts_time
    WHERE attempted_at >= :since
    GROUP BY endpoint
    UNION ALL
    SELECT endpoint, sum(count), sum(CASE WHEN status BETWEEN 200 AND 299 THEN count ELSE 0 END)
    FROM attempt_batches INDEXED BY attempt_batches_time
    WHERE attempted_at >= :since
    GROUP BY endpoint
)
GROUP BY endpoint

-- name: last_attempt
-- The newest logged attempt or batch of first-try successes (its last event).
SELECT attempted_at, event_id, status, duration_ms, error FROM (
    SELECT attempted_at, event_id, status, duration_ms, error
    FROM attempts WHERE endpoint = :endpoint ORDER BY id DESC LIMIT 1
) UNION ALL SELECT * FROM (
    SELECT attempted_at, last_event_id, status, median_ms, NULL
    FROM attempt_batches WHERE endpoint = :endpoint ORDER BY id DESC LIMIT 1
)
ORDER BY attempted_at DESC
LIMIT 1

-- name: event_types
-- Every distinct type in the outbox, by a loose scan of events_type_id: one index seek per
-- type, however many events each type has.
WITH RECURSIVE types (type) AS (
    SELECT min(type) FROM events
    UNION ALL
    SELECT (SELECT min(type) FROM events WHERE type > types.type) FROM types WHERE types.type IS NOT NULL
)
SELECT type FROM types WHERE type IS NOT NULL

-- name: type_event_ids
-- The first :limit ids of one type after :after, up to :upto: a range of events_type_id.
SELECT id FROM events WHERE type = :type AND id > :after AND id <= :upto ORDER BY id LIMIT :limit

-- name: events_by_ids
SELECT id, type, occurred_at, data, source_table, op, lsn, xid
FROM events
WHERE id IN (SELECT value FROM json_each(:ids))
ORDER BY id

-- name: tables_since
SELECT id, source_table FROM events WHERE id > :after ORDER BY id LIMIT :limit

-- name: newest_event_id
SELECT coalesce(max(id), 0) FROM events

-- name: status_history
-- The last :limit captured status changes of one order, newest first (entity_key holds
-- the key as text: '77').  The new and previous status come from the stored data.
SELECT id, occurred_at, json_extract(data, '$.record.status'), json_extract(data, '$.previous.status')
FROM events INDEXED BY events_status_history
WHERE type = 'order.status_changed' AND entity_key = :key
ORDER BY id DESC
LIMIT :limit
