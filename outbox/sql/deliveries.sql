-- Deliveries: the dispatcher's claims and attempt log, and what operators list and replay.

-- name: claim
-- Due deliveries of one endpoint, only the oldest pending one of each entity, so one
-- entity's events go out strictly in order while other entities proceed.  Deliveries in
-- flight (:skip, a JSON array of event ids) are left out.  The whole batch comes back as
-- one JSON array in one row: one step of SQLite, so the claim thread takes the GIL once
-- instead of once per row.
SELECT json_group_array(json_array(event_id, attempts, type, occurred_at, data, source_table, op, lsn, xid))
FROM (
    SELECT d.event_id, d.attempts, e.type, e.occurred_at, e.data, e.source_table, e.op, e.lsn, e.xid
    FROM deliveries d INDEXED BY deliveries_pending
    JOIN events e ON e.id = d.event_id
    WHERE d.endpoint = :endpoint
      AND d.status = 'pending'
      AND d.next_attempt_at <= :now
      AND d.event_id NOT IN (SELECT value FROM json_each(:skip))
      AND NOT EXISTS (
          SELECT 1 FROM deliveries p INDEXED BY deliveries_entity
          WHERE p.endpoint = d.endpoint AND p.status = 'pending'
            AND p.entity = d.entity AND p.event_id < d.event_id
      )
    ORDER BY d.event_id
    LIMIT :limit
)

-- name: next_due
SELECT min(next_attempt_at) FROM deliveries INDEXED BY deliveries_pending
WHERE endpoint = ? AND status = 'pending'

-- name: record_attempts
-- A batch of attempts as one JSON array of
-- [endpoint, event_id, attempted_at, status, duration_ms, error, response]:
-- one statement per group commit, not one per attempt.
INSERT INTO attempts (endpoint, event_id, attempted_at, status, duration_ms, error, response)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'),
       json_extract(value, '$[6]')
FROM json_each(:batch)

-- name: finish_deliveries
-- The same batch: each delivery's new state ([.., status, next_attempt_at] at 7 and 8).
UPDATE deliveries
SET status = f.status, attempts = attempts + 1, next_attempt_at = f.next_attempt_at,
    last_status = f.http_status, last_error = f.error
FROM (
    SELECT json_extract(value, '$[0]') AS endpoint, json_extract(value, '$[1]') AS event_id,
           json_extract(value, '$[3]') AS http_status, json_extract(value, '$[5]') AS error,
           json_extract(value, '$[7]') AS status, json_extract(value, '$[8]') AS next_attempt_at
    FROM json_each(:batch)
) AS f
WHERE deliveries.endpoint = f.endpoint AND deliveries.event_id = f.event_id

-- name: list_deliveries
-- The delivery rows, and the pending deliveries whose rows the dispatcher has not made
-- yet (the events past an endpoint's cursor that its routes take).
SELECT endpoint, event_id, type, status, attempts, next_attempt_at, last_status, last_error FROM (
    SELECT d.endpoint AS endpoint, d.event_id AS event_id, e.type AS type, d.status AS status,
           d.attempts AS attempts, d.next_attempt_at AS next_attempt_at,
           d.last_status AS last_status, d.last_error AS last_error
    FROM deliveries d JOIN events e ON e.id = d.event_id
    WHERE (:status IS NULL OR d.status = :status)
      AND (:endpoint IS NULL OR d.endpoint = :endpoint)
      AND (:event_id IS NULL OR d.event_id = :event_id)
      AND d.event_id > :after
    UNION ALL
    SELECT c.endpoint, e.id, e.type, 'pending', 0, 0.0, NULL, NULL
    FROM delivery_cursors c
    JOIN events e ON e.id > max(c.last_event_id, :after) AND e.routed = 0
    JOIN endpoint_routes r ON r.endpoint = c.endpoint AND r.type = e.type
    WHERE (:status IS NULL OR :status = 'pending')
      AND (:endpoint IS NULL OR c.endpoint = :endpoint)
      AND (:event_id IS NULL OR e.id = :event_id)
)
ORDER BY event_id, endpoint
LIMIT :limit

-- name: delivery_attempts
SELECT endpoint, attempted_at, status, duration_ms, error, response
FROM attempts WHERE event_id = ? ORDER BY id

-- name: make_event_rows
-- The rows of one event not made yet (before a replay of it).
INSERT OR IGNORE INTO deliveries (event_id, endpoint, entity)
SELECT e.id, c.endpoint, e.object || ':' || coalesce(e.entity_key, '')
FROM events e
JOIN delivery_cursors c ON c.last_event_id < e.id
JOIN endpoint_routes r ON r.endpoint = c.endpoint AND r.type = e.type
WHERE e.id = :event_id AND e.routed = 0 AND (:endpoint IS NULL OR c.endpoint = :endpoint)

-- name: replay_event
UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = :now
WHERE event_id = :event_id AND (:endpoint IS NULL OR endpoint = :endpoint)

-- name: replay_dead
UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = :now
WHERE status = 'dead' AND (:endpoint IS NULL OR endpoint = :endpoint)
  AND event_id IN (SELECT id FROM events WHERE created_at >= :since)

-- name: cursor_of
SELECT last_event_id FROM delivery_cursors WHERE endpoint = ?

-- name: materialize
-- The delivery rows of the events in (after, upto] that the endpoint's routes take.
INSERT OR IGNORE INTO deliveries (event_id, endpoint, entity)
SELECT e.id, :endpoint, e.object || ':' || coalesce(e.entity_key, '')
FROM events e
JOIN endpoint_routes r ON r.endpoint = :endpoint AND r.type = e.type
WHERE e.id > :after AND e.id <= :upto AND e.routed = 0
ORDER BY e.id

-- name: move_cursor
UPDATE delivery_cursors SET last_event_id = :upto WHERE endpoint = :endpoint
