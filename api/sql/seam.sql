-- The seam between an export and the events cursor (api/handover.py): statements on the
-- marketplace database, whatever its schema (not part of a replaced exports.sql).

-- name: repeatable_read
-- Before any query: every statement of the export reads the one snapshot taken next.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY

-- name: seam
-- The first statement: the snapshot, then the WAL insert position (every transaction the
-- snapshot sees has its commit record before it), then capture's own heartbeat (prefix
-- 'ct1-cdc', as cdc/source.py HEARTBEAT_PREFIX), a non-transactional logical message after
-- that position that makes an idle capture confirm past it.  No xid is assigned, and it
-- works in a read-only transaction.
SELECT pg_current_snapshot()::text,
       pg_current_wal_insert_lsn()::text,
       pg_logical_emit_message(false, 'ct1-cdc', 'heartbeat ' || extract(epoch FROM clock_timestamp()))

-- name: seam_quiet
-- The same without the message, when the role may not emit one; capture's own heartbeats
-- (source.heartbeat_seconds) then bound the wait.
SELECT pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text

-- name: slot_position
-- Read from shared memory: current even inside a repeatable-read transaction.
SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = %s
