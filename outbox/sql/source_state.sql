-- What the outbox keeps about the source besides events: replica identities setup
-- changed, mapping problems capture found, transactions an operator asked to skip.

-- name: record_identity_change
-- The first recorded identity wins: running setup twice must not forget the original.
INSERT INTO source_changes (tbl, schema_name, table_name, identity, index_name, changed_at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (tbl) DO NOTHING

-- name: identity_changes
SELECT tbl, schema_name, table_name, identity, index_name FROM source_changes ORDER BY tbl

-- name: forget_identity_change
DELETE FROM source_changes WHERE tbl = ?

-- name: clear_problems
DELETE FROM mapping_problems

-- name: insert_problem
INSERT INTO mapping_problems (kind, tbl, rule, message, fix, since) VALUES (?, ?, ?, ?, ?, ?)

-- name: problems
SELECT kind, tbl, rule, message, fix, since FROM mapping_problems ORDER BY since, tbl, rule

-- name: count_problems
SELECT count(*) FROM mapping_problems

-- name: request_skip
INSERT INTO skipped_transactions (xid, requested_at) VALUES (?, ?)
ON CONFLICT (xid) DO NOTHING

-- name: pending_skips
SELECT xid FROM skipped_transactions WHERE skipped_at IS NULL

-- name: mark_skipped
UPDATE skipped_transactions SET skipped_at = ?, lsn = ?, changes = ? WHERE xid = ?

-- name: skips
SELECT xid, requested_at, skipped_at, lsn, changes FROM skipped_transactions ORDER BY requested_at
