-- Derived events' state (outbox/state.py).

-- name: get
SELECT value FROM derived_state WHERE kind = :kind AND key = :key

-- name: put
INSERT INTO derived_state (kind, key, value, ref, due) VALUES (:kind, :key, :value, :ref, :due)
ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value, ref = excluded.ref, due = excluded.due

-- name: delete
DELETE FROM derived_state WHERE kind = :kind AND key = :key

-- name: by_ref
-- INDEXED BY: SQLite does not see that ref = :ref implies the partial index's ref IS NOT
-- NULL, and would scan every row of the kind (the caller sorts).
SELECT key, value FROM derived_state INDEXED BY derived_state_ref WHERE kind = :kind AND ref = :ref

-- name: due
-- Read lazily, as far as the caller needs (it passes over rows it holds newer values of).
SELECT key, value, due FROM derived_state
WHERE kind = :kind AND due IS NOT NULL AND due <= :until
ORDER BY due, key

-- name: refs
SELECT DISTINCT ref FROM derived_state INDEXED BY derived_state_ref WHERE kind = :kind AND ref IS NOT NULL
LIMIT :limit

-- name: count
SELECT count(*), count(due) FROM derived_state WHERE kind = :kind
