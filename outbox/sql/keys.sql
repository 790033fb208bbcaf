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

-- name: add_usage
-- A batch of [key_id, route, requests, last_used_at] as one JSON array.
INSERT INTO api_usage (key_id, route, requests, last_used_at)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]')
FROM json_each(:batch) WHERE true
ON CONFLICT (key_id, route) DO UPDATE
SET requests = api_usage.requests + excluded.requests,
    last_used_at = max(api_usage.last_used_at, excluded.last_used_at)

-- name: touch_keys
UPDATE api_keys
SET last_used_at = max(coalesce(api_keys.last_used_at, 0), u.last_used_at)
FROM (
    SELECT json_extract(value, '$[0]') AS key_id, max(json_extract(value, '$[3]')) AS last_used_at
    FROM json_each(:batch) GROUP BY 1
) AS u
WHERE api_keys.id = u.key_id

-- name: usage
SELECT u.key_id, k.name, u.route, u.requests, u.last_used_at
FROM api_usage u LEFT JOIN api_keys k ON k.id = u.key_id
ORDER BY u.key_id, u.route

-- name: key_requests
SELECT key_id, sum(requests) FROM api_usage GROUP BY key_id
