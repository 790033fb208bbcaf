-- Deliveries: the dispatcher's claims and attempt log, and what operators list and replay.

-- name: claim
-- Due delivery rows of one endpoint (retries, replays, events queued behind one of their
-- entity), only the oldest pending one of each entity, so one entity's events go out
-- strictly in order while other entities proceed.  Rows the dispatcher holds in flight
-- (:skip, a JSON array of event ids), rows of entities it has in memory (:busy, a JSON
-- array of entities) and rows past what it has read of the events (:horizon) are left
-- out.  The whole batch comes back as one JSON array in one row: one step of SQLite, so
-- the claim thread takes the GIL once instead of once per row.
SELECT json_group_array(json_array(event_id, attempts, entity, type, occurred_at, data, source_table, op, lsn, xid))
FROM (
    SELECT d.event_id, d.attempts, d.entity, e.type, e.occurred_at, e.data, e.source_table, e.op, e.lsn, e.xid
    FROM deliveries d INDEXED BY deliveries_pending
    JOIN events e ON e.id = d.event_id
    WHERE d.endpoint = :endpoint
      AND d.status = 'pending'
      AND d.next_attempt_at <= :now
      AND d.event_id <= :horizon
      AND d.event_id NOT IN (SELECT value FROM json_each(:skip))
      AND d.entity NOT IN (SELECT value FROM json_each(:busy))
      AND (:parts IS NULL OR ct1_partition(d.entity) IN (SELECT value FROM json_each(:parts)))
      AND NOT EXISTS (
          SELECT 1 FROM deliveries p INDEXED BY deliveries_entity
          WHERE p.endpoint = d.endpoint AND p.status = 'pending'
            AND p.entity = d.entity AND p.event_id < d.event_id
      )
    ORDER BY d.event_id
    LIMIT :limit
)

-- name: fresh
-- The events in (:after, :upto] that the endpoint takes and that have no delivery row
-- (those are the claim's), oldest first: sent from here, a first-try success never gets
-- a row.  `blocked`: its entity has a pending row before it, so it must queue behind.
SELECT json_group_array(json_array(id, entity, blocked, type, occurred_at, data, source_table, op, lsn, xid))
FROM (
    SELECT e.id, e.object || ':' || coalesce(e.entity_key, '') AS entity,
           EXISTS (
               SELECT 1 FROM deliveries p INDEXED BY deliveries_entity
               WHERE p.endpoint = :endpoint AND p.status = 'pending'
                 AND p.entity = e.object || ':' || coalesce(e.entity_key, '') AND p.event_id < e.id
           ) AS blocked,
           e.type, e.occurred_at, e.data, e.source_table, e.op, e.lsn, e.xid
    FROM events e
    WHERE e.id > :after AND e.id <= :upto AND e.routed = 0
      AND e.type IN (SELECT type FROM endpoint_routes WHERE endpoint = :endpoint)
      AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.endpoint = :endpoint AND d.event_id = e.id)
      AND (:parts IS NULL OR ct1_partition(e.object || ':' || coalesce(e.entity_key, ''))
                             IN (SELECT value FROM json_each(:parts)))
    ORDER BY e.id
    LIMIT :limit
)

-- name: next_due
SELECT min(next_attempt_at) FROM deliveries INDEXED BY deliveries_pending
WHERE endpoint = :endpoint AND status = 'pending'
  AND (:parts IS NULL OR ct1_partition(entity) IN (SELECT value FROM json_each(:parts)))

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

-- name: insert_failed
-- First attempts that failed (same batch layout): the delivery gets its row now, pending
-- with its next attempt or dead.  A row may exist already (a replay made it meanwhile).
INSERT INTO deliveries (event_id, endpoint, entity, status, attempts, next_attempt_at, last_status, last_error)
SELECT json_extract(value, '$[1]'), json_extract(value, '$[0]'), json_extract(value, '$[9]'),
       json_extract(value, '$[7]'), 1, json_extract(value, '$[8]'),
       json_extract(value, '$[3]'), json_extract(value, '$[5]')
FROM json_each(:batch) WHERE true
ON CONFLICT (endpoint, event_id) DO UPDATE
SET status = excluded.status, attempts = attempts + 1, next_attempt_at = excluded.next_attempt_at,
    last_status = excluded.last_status, last_error = excluded.last_error

-- name: queue_rows
-- Events that wait behind a pending delivery of their entity: a row each, due now, so
-- the claim sends them once the one before is delivered.  [endpoint, event_id, entity]
INSERT OR IGNORE INTO deliveries (event_id, endpoint, entity, status, attempts, next_attempt_at)
SELECT json_extract(value, '$[1]'), json_extract(value, '$[0]'), json_extract(value, '$[2]'), 'pending', 0, 0
FROM json_each(:batch)

-- name: record_batch
INSERT INTO attempt_batches
    (endpoint, first_event_id, last_event_id, attempted_at, status, count, median_ms, max_ms, event_ids,
     generation)
VALUES (:endpoint, :first, :last, :attempted_at, :status, :count, :median_ms, :max_ms, :event_ids,
        :generation)

-- name: advance_cursor
-- Only forward, and only if nobody moved it back meanwhile (`outbox replay --from`).
UPDATE delivery_cursors SET last_event_id = :upto
WHERE endpoint = :endpoint AND generation = :generation AND last_event_id < :upto

-- name: list_deliveries
-- The delivery rows; the first-try successes (in attempt_batches, no row); and the events
-- past an endpoint's cursor that its routes take and that have no row yet (pending).
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
    SELECT b.endpoint, j.value, e.type, 'delivered', 1, b.attempted_at, b.status, NULL
    FROM attempt_batches b, json_each(b.event_ids) j
    JOIN events e ON e.id = j.value
    WHERE (:status IS NULL OR :status = 'delivered')
      AND (:endpoint IS NULL OR b.endpoint = :endpoint)
      AND (:event_id IS NULL OR (b.first_event_id BETWEEN :event_id - :span AND :event_id
                                 AND j.value = :event_id))
      AND j.value > :after
      AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.endpoint = b.endpoint AND d.event_id = j.value)
      AND j.value <= (SELECT c.last_event_id FROM delivery_cursors c WHERE c.endpoint = b.endpoint)
    UNION ALL
    SELECT c.endpoint, e.id, e.type, 'pending', 0, 0.0, NULL, NULL
    FROM delivery_cursors c
    JOIN events e ON e.id > max(c.last_event_id, :after) AND e.routed = 0
    JOIN endpoint_routes r ON r.endpoint = c.endpoint AND r.type = e.type
    WHERE (:status IS NULL OR :status = 'pending')
      AND (:endpoint IS NULL OR c.endpoint = :endpoint)
      AND (:event_id IS NULL OR e.id = :event_id)
      AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.endpoint = c.endpoint AND d.event_id = e.id)
)
ORDER BY event_id, endpoint
LIMIT :limit

-- name: delivery_attempts
-- Every attempt of one event, oldest first: the logged ones (every failure, and every
-- attempt of a delivery that has a row), and a first-try success from its batch (its
-- time is the batch's first attempt, its duration the batch's median).
SELECT endpoint, attempted_at, status, duration_ms, error, response FROM (
    SELECT endpoint, attempted_at, status, duration_ms, error, response, 0 AS batch, id
    FROM attempts WHERE event_id = :event_id
    UNION ALL
    SELECT b.endpoint, b.attempted_at, b.status, b.median_ms, NULL, NULL, 1, b.id
    FROM attempt_batches b
    WHERE b.first_event_id BETWEEN :event_id - :span AND :event_id AND b.last_event_id >= :event_id
      AND EXISTS (SELECT 1 FROM json_each(b.event_ids) WHERE value = :event_id)
)
ORDER BY attempted_at, batch, id

-- name: make_event_rows
-- The rows of one event that it has no row for yet (before a replay of it): for each
-- endpoint whose routes take it, delivered on the first try or not sent yet.
INSERT OR IGNORE INTO deliveries (event_id, endpoint, entity)
SELECT e.id, c.endpoint, e.object || ':' || coalesce(e.entity_key, '')
FROM events e
JOIN delivery_cursors c
JOIN endpoint_routes r ON r.endpoint = c.endpoint AND r.type = e.type
WHERE e.id = :event_id AND e.routed = 0 AND (:endpoint IS NULL OR c.endpoint = :endpoint)

-- name: replay_event
UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = :now, replayed = 1
WHERE event_id = :event_id AND (:endpoint IS NULL OR endpoint = :endpoint)

-- name: replay_dead
UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = :now, replayed = 1
WHERE status = 'dead' AND (:endpoint IS NULL OR endpoint = :endpoint)
  AND event_id IN (SELECT id FROM events WHERE created_at >= :since)

-- name: cursor_of
SELECT last_event_id, generation FROM delivery_cursors WHERE endpoint = ?

-- name: rewind_cursor
-- `outbox replay --from`: the endpoint's events from :from on are sent again.  Its rows
-- from there are made due again; the events without a row come back past the cursor.
-- Never forward: the events between would be skipped.
UPDATE delivery_cursors SET last_event_id = min(last_event_id, :from - 1), generation = generation + 1
WHERE endpoint = :endpoint

-- name: rewind_rows
UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = :now
WHERE endpoint = :endpoint AND event_id >= :from AND status <> 'pending'

-- name: materialize
-- The delivery rows of the events in (after, upto] that the endpoint's routes take.
INSERT OR IGNORE INTO deliveries (event_id, endpoint, entity)
SELECT e.id, :endpoint, e.object || ':' || coalesce(e.entity_key, '')
FROM events e
JOIN endpoint_routes r ON r.endpoint = :endpoint AND r.type = e.type
WHERE e.id > :after AND e.id <= :upto AND e.routed = 0
ORDER BY e.id

-- name: take_partition_settled
-- A partition taken over: its pending rows up to where the last holder settled it were
-- settled by that holder (rows left from an earlier holding, or made at append); a replay
-- stays (the holder may have gone before sending it) and goes out in its entity's order.
DELETE FROM deliveries
WHERE endpoint = :endpoint AND status = 'pending' AND event_id <= :after
  AND ct1_partition(entity) = :part AND replayed = 0

-- name: take_partition
-- A partition taken over from another dispatcher (JetStream backend): a row due now for
-- each event of partition :part in (:after, :upto] that the endpoint takes (by its routes,
-- routed to every endpoint as ct1.gap is, or sent to a list of endpoints naming it), sent
-- from there in order by the claim; a pending row already there is due now too, a
-- settled one stays as it is.
INSERT INTO deliveries (event_id, endpoint, entity, next_attempt_at)
SELECT e.id, :endpoint, e.object || ':' || coalesce(e.entity_key, ''), :now
FROM events e
WHERE e.id > :after AND e.id <= :upto
  AND CASE WHEN e.routed = 0 THEN e.type IN (SELECT type FROM endpoint_routes WHERE endpoint = :endpoint)
           WHEN e.endpoints IS NULL THEN 1
           ELSE :endpoint IN (SELECT value FROM json_each(e.endpoints)) END
  AND ct1_partition(e.object || ':' || coalesce(e.entity_key, '')) = :part
ON CONFLICT (endpoint, event_id) DO UPDATE SET next_attempt_at = excluded.next_attempt_at
WHERE deliveries.status = 'pending'

-- name: release_partitions
-- Partitions given up to another dispatcher: their pending rows of the endpoint go (a
-- replay stays: every node has it due, from the cluster, until one says it is settled).
DELETE FROM deliveries
WHERE endpoint = :endpoint AND status = 'pending' AND replayed = 0
  AND ct1_partition(entity) IN (SELECT value FROM json_each(:parts))

-- name: pending_by_entity
-- The first pending delivery of each entity of an endpoint (what holds its progress back;
-- not a replay, which every node has due and the next holder keeps).
SELECT entity, min(event_id) FROM deliveries INDEXED BY deliveries_entity
WHERE endpoint = :endpoint AND status = 'pending' AND replayed = 0 GROUP BY entity

-- name: move_cursor
UPDATE delivery_cursors SET last_event_id = :upto WHERE endpoint = :endpoint

-- name: count_from
-- How many events from :from on the endpoint takes (routed by type, or by a row).
SELECT count(*) FROM events e
WHERE e.id >= :from
  AND ((e.routed = 0 AND e.type IN (SELECT type FROM endpoint_routes WHERE endpoint = :endpoint))
       OR EXISTS (SELECT 1 FROM deliveries d WHERE d.endpoint = :endpoint AND d.event_id = e.id))

-- name: batched_after
-- The events past :cursor already in a batch of first-try successes, with the generation
-- of the cursor they were sent under: the current one, they are done (a crash left them
-- past the cursor); an older one, `replay --from` asked for them again.
SELECT j.value, b.generation FROM attempt_batches b, json_each(b.event_ids) j
WHERE b.endpoint = :endpoint AND b.first_event_id > :cursor - :span AND j.value > :cursor

-- name: batches_holding
-- Deliveries that get a row (a replay, a failure when sent again) leave their batch of
-- first-try successes: that first attempt goes to the attempt log, so it is still shown
-- and the delivery is counted once, by its row.  :pairs is a JSON array of
-- [endpoint, event_id]; this finds their batches, as [batch id, event_id] rows.
SELECT b.id, t.event_id
FROM (SELECT json_extract(value, '$[0]') AS endpoint, json_extract(value, '$[1]') AS event_id
      FROM json_each(:pairs)) AS t
JOIN attempt_batches b
  ON b.endpoint = t.endpoint AND b.first_event_id BETWEEN t.event_id - :span AND t.event_id
 AND b.last_event_id >= t.event_id
WHERE EXISTS (SELECT 1 FROM json_each(b.event_ids) WHERE value = t.event_id)

-- name: unbatch_attempts
-- :held is a JSON array of [batch id, event_id] (from batches_holding).
INSERT INTO attempts (endpoint, event_id, attempted_at, status, duration_ms)
SELECT b.endpoint, json_extract(h.value, '$[1]'), b.attempted_at, b.status, b.median_ms
FROM json_each(:held) h JOIN attempt_batches b ON b.id = json_extract(h.value, '$[0]')

-- name: unbatch_events
UPDATE attempt_batches
SET event_ids = (
    SELECT json_group_array(j.value) FROM json_each(attempt_batches.event_ids) j
    WHERE NOT EXISTS (
        SELECT 1 FROM json_each(:held) h
        WHERE json_extract(h.value, '$[0]') = attempt_batches.id AND json_extract(h.value, '$[1]') = j.value
    )
)
WHERE id IN (SELECT json_extract(value, '$[0]') FROM json_each(:held))

-- name: unbatch_counts
UPDATE attempt_batches SET count = json_array_length(event_ids)
WHERE id IN (SELECT json_extract(value, '$[0]') FROM json_each(:held))

-- name: drop_empty_batches
DELETE FROM attempt_batches
WHERE count = 0 AND id IN (SELECT json_extract(value, '$[0]') FROM json_each(:held))

-- name: cursor_names
SELECT endpoint FROM delivery_cursors ORDER BY endpoint

-- The JetStream backend shares dead deliveries and replays through a key-value bucket
-- (outbox/jetstream_shared.py): what a node's dispatcher gave up on, for every node, and
-- what an operator replayed on any node, for the node that holds its partition.

-- name: dead_to_share
SELECT endpoint, event_id, entity, attempts, last_status, last_error FROM deliveries WHERE status = 'dead'

-- name: status_of
SELECT status FROM deliveries WHERE endpoint = ? AND event_id = ?

-- name: entity_of
SELECT object || ':' || coalesce(entity_key, '') FROM events WHERE id = ?

-- name: replayable_dead
SELECT endpoint, event_id, entity FROM deliveries
WHERE status = 'dead' AND (:endpoint IS NULL OR endpoint = :endpoint)
  AND event_id IN (SELECT id FROM events WHERE created_at >= :since)

-- name: rows_of_event
-- what replay_event would make due: the event's rows, and those make_event_rows would add
SELECT endpoint, event_id, entity FROM deliveries
WHERE event_id = :event_id AND (:endpoint IS NULL OR endpoint = :endpoint)
UNION
SELECT c.endpoint, e.id, e.object || ':' || coalesce(e.entity_key, '')
FROM events e
JOIN delivery_cursors c
JOIN endpoint_routes r ON r.endpoint = c.endpoint AND r.type = e.type
WHERE e.id = :event_id AND e.routed = 0 AND (:endpoint IS NULL OR c.endpoint = :endpoint)
ORDER BY 1

-- name: shared_dead
-- another node gave up on it (what this node delivered stays delivered)
INSERT INTO deliveries (endpoint, event_id, entity, status, attempts, last_status, last_error)
VALUES (:endpoint, :event_id, :entity, 'dead', :attempts, :last_status, :last_error)
ON CONFLICT (endpoint, event_id) DO UPDATE SET
    status = 'dead', attempts = excluded.attempts, last_status = excluded.last_status,
    last_error = excluded.last_error
WHERE deliveries.status <> 'delivered'

-- name: shared_replayed
-- replayed on some node: due now here (sent by whichever node holds its partition)
INSERT INTO deliveries (endpoint, event_id, entity, status, attempts, next_attempt_at, replayed)
VALUES (:endpoint, :event_id, :entity, 'pending', 0, :now, 1)
ON CONFLICT (endpoint, event_id) DO UPDATE SET
    status = 'pending', attempts = 0, next_attempt_at = :now, replayed = 1
WHERE deliveries.status <> 'pending'

-- name: shared_delivered
-- the holder delivered what was replayed
UPDATE deliveries SET status = 'delivered'
WHERE endpoint = :endpoint AND event_id = :event_id AND status <> 'delivered'
