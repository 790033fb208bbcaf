-- API keys.

-- name: insert_key
INSERT INTO api_keys (id, name, key_hash, prefix, permissions, allow_ips, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?)

-- name: list_keys
SELECT id, name, prefix, permissions, allow_ips, created_at, revoked_at, last_used_at
FROM api_keys ORDER BY created_at, id

-- name: revoke_key
UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL

-- name: key_exists
SELECT revoked_at FROM api_keys WHERE id = ?

-- name: count_keys
SELECT count(*) FROM api_keys WHERE revoked_at IS NULL

-- name: find_key
SELECT id, name, permissions, allow_ips, revoked_at FROM api_keys WHERE key_hash = ?
