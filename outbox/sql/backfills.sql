-- Backfill jobs (outbox/backfills.py).

-- name: insert
INSERT INTO backfills (request, tbl, condition, rate, reason, created_at, updated_at)
VALUES (:request, :tbl, :condition, :rate, :reason, :now, :now)

-- name: set_request
UPDATE backfills SET request = :request WHERE id >= :request AND id <= :last

-- name: active
SELECT * FROM backfills INDEXED BY backfills_active WHERE state IN ('queued', 'running') ORDER BY id

-- name: of_request
SELECT * FROM backfills WHERE request = :request ORDER BY id

-- name: last_request
SELECT max(request) FROM backfills

-- name: recent
SELECT * FROM backfills ORDER BY id DESC LIMIT :limit

-- name: update
-- Capture's progress, in its group commit.  NULL leaves a column as it is.
UPDATE backfills SET
    state = coalesce(:state, state),
    after_key = coalesce(:after_key, after_key),
    reread = coalesce(:reread, reread),
    rows_done = coalesce(:rows_done, rows_done),
    events = coalesce(:events, events),
    total = coalesce(:total, total),
    error = coalesce(:error, error),
    started_at = coalesce(started_at, CASE WHEN :state = 'running' THEN :now END),
    finished_at = CASE WHEN :state IN ('done', 'cancelled', 'failed') THEN :now ELSE finished_at END,
    updated_at = :now
WHERE id = :id AND state IN ('queued', 'running')  -- an ended job stays as it ended

-- name: cancel
-- A queued job capture has not started ends at once (capture may not even run); a running
-- one is asked to stop, which capture does at its next chunk.
UPDATE backfills SET
    cancel_requested_at = :now,
    state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END,
    finished_at = CASE WHEN state = 'queued' THEN :now ELSE finished_at END,
    updated_at = :now
WHERE state IN ('queued', 'running') AND (:request IS NULL OR request = :request)
  AND cancel_requested_at IS NULL

-- name: stop_active
UPDATE backfills SET state = :state, error = :error, finished_at = :now, updated_at = :now
WHERE state IN ('queued', 'running')
