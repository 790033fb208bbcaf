-- Endpoint state: health the dispatcher keeps, the operator's enable/disable, signing secrets.

-- name: endpoint_state
SELECT name, state, failures, paused_until, secret, updated_at FROM endpoints WHERE name = ?

-- name: set_endpoint_state
UPDATE endpoints SET state = :state, failures = :failures, paused_until = :paused_until,
    updated_at = :now
WHERE name = :name

-- name: set_endpoint_secret
UPDATE endpoints SET secret = ? WHERE name = ? AND secret IS NULL

-- name: set_state_by_operator
-- `ct1-cdc endpoints enable|disable`: a fresh start, failures forgotten.
UPDATE endpoints SET state = :state, failures = 0, paused_until = 0, updated_at = :now WHERE name = :name

-- name: endpoint_secret
SELECT secret FROM endpoints WHERE name = ?
