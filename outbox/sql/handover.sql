-- Where an export hands over to the events cursor (outbox/handover.py).

-- name: newest_event_id
SELECT coalesce(max(id), 0) FROM events

-- name: source_xids
-- The captured events after :after up to :upto that carry a source transaction id, by id
-- (a range of the primary key); derived, manual and backfill events carry none.
SELECT id, xid
FROM events
WHERE id > :after AND id <= :upto AND xid IS NOT NULL
ORDER BY id

-- name: checkpoint_lsn
SELECT lsn FROM checkpoint WHERE slot = ?
