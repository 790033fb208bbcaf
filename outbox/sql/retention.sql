-- Retention: settled events past the cutoff go, with their deliveries and attempts.

-- name: prune_candidates
-- Events older than the cutoff whose every delivery is made and settled (delivered or dead).
-- Deliveries are found by their primary key (endpoint, event_id), one probe per endpoint.
SELECT id FROM events
WHERE created_at < :cutoff
  AND id <= (  -- and every endpoint has made its row for it (its cursor is past it)
      SELECT coalesce(min(c.last_event_id), events.id) FROM delivery_cursors c
      WHERE EXISTS (SELECT 1 FROM endpoint_routes r WHERE r.endpoint = c.endpoint)
  )
  AND NOT EXISTS (
      SELECT 1 FROM deliveries d
      WHERE d.endpoint IN (SELECT name FROM endpoints) AND d.event_id = events.id AND d.status = 'pending'
  )
ORDER BY id
LIMIT :batch

-- name: prune_count
-- How many events prune_candidates would find, without a limit (`outbox prune --dry-run`).
SELECT count(*) FROM events
WHERE created_at < :cutoff
  AND id <= (
      SELECT coalesce(min(c.last_event_id), events.id) FROM delivery_cursors c
      WHERE EXISTS (SELECT 1 FROM endpoint_routes r WHERE r.endpoint = c.endpoint)
  )
  AND NOT EXISTS (
      SELECT 1 FROM deliveries d
      WHERE d.endpoint IN (SELECT name FROM endpoints) AND d.event_id = events.id AND d.status = 'pending'
  )

-- name: prune_attempts
DELETE FROM attempts
WHERE endpoint IN (SELECT name FROM endpoints) AND event_id IN (SELECT value FROM json_each(:ids))

-- name: prune_deliveries
DELETE FROM deliveries
WHERE endpoint IN (SELECT name FROM endpoints) AND event_id IN (SELECT value FROM json_each(:ids))

-- name: prune_batch_events
-- The pruned events leave the batches of first-try successes that held them; a batch
-- with none left goes (so the counts of delivered keep matching the events kept).
UPDATE attempt_batches
SET event_ids = (
    SELECT json_group_array(value) FROM json_each(attempt_batches.event_ids)
    WHERE value NOT IN (SELECT value FROM json_each(:ids))
)
WHERE first_event_id BETWEEN :first - :span AND :last AND last_event_id >= :first

-- name: prune_batch_counts
UPDATE attempt_batches SET count = json_array_length(event_ids)
WHERE first_event_id BETWEEN :first - :span AND :last AND last_event_id >= :first

-- name: prune_empty_batches
DELETE FROM attempt_batches
WHERE first_event_id BETWEEN :first - :span AND :last AND count = 0

-- name: prune_events
DELETE FROM events WHERE id IN (SELECT value FROM json_each(:ids))
