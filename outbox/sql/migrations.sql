-- Outbox schema migrations, applied in order; PRAGMA user_version records the last one.
-- A migration is never edited once released: add a new block instead.

-- name: 1
CREATE TABLE events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    type         TEXT    NOT NULL,
    object       TEXT    NOT NULL,
    entity_key   TEXT,
    occurred_at  TEXT    NOT NULL,          -- source commit time, ISO 8601 UTC
    data         TEXT    NOT NULL,          -- JSON: the envelope's "data"
    source_table TEXT,
    op           TEXT,
    lsn          TEXT,
    xid          INTEGER,
    created_at   REAL    NOT NULL           -- unix time the outbox committed it
);
CREATE INDEX events_type_id ON events (type, id);

-- One row per (event, endpoint), clustered by endpoint then event: a dispatcher walks an
-- endpoint's deliveries in event order, and an event can never get two for one endpoint.
CREATE TABLE deliveries (
    endpoint        TEXT    NOT NULL,
    event_id        INTEGER NOT NULL REFERENCES events (id),
    entity          TEXT    NOT NULL,       -- object:key, the unit of ordering
    status          TEXT    NOT NULL DEFAULT 'pending',  -- pending | delivered | dead
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL    NOT NULL DEFAULT 0,
    PRIMARY KEY (endpoint, event_id)
) WITHOUT ROWID;
CREATE INDEX deliveries_pending ON deliveries (endpoint, event_id) WHERE status = 'pending';

-- Every endpoint that ever had a delivery, with its delivery state.
CREATE TABLE endpoints (
    name       TEXT PRIMARY KEY,
    state      TEXT NOT NULL DEFAULT 'active',   -- active | paused | disabled
    updated_at REAL NOT NULL DEFAULT 0
);

CREATE TABLE checkpoint (
    slot       TEXT    PRIMARY KEY,
    lsn        INTEGER NOT NULL,            -- end of the last source transaction appended
    updated_at REAL    NOT NULL
);

CREATE TABLE shadow (
    tbl  TEXT NOT NULL,
    key  TEXT NOT NULL,
    vals TEXT NOT NULL,                     -- JSON of the watched columns' last values
    PRIMARY KEY (tbl, key)
) WITHOUT ROWID;

-- name: 2
-- Delivery: the attempt log, endpoint health and stored signing secrets.
CREATE TABLE attempts (
    id           INTEGER PRIMARY KEY,
    endpoint     TEXT    NOT NULL,
    event_id     INTEGER NOT NULL,
    attempted_at REAL    NOT NULL,
    status       INTEGER NOT NULL,          -- HTTP status, 0 for a network error or timeout
    duration_ms  REAL    NOT NULL,
    error        TEXT,
    response     TEXT                       -- the first 1 KiB of the response body
);
CREATE INDEX attempts_delivery ON attempts (endpoint, event_id);
CREATE INDEX attempts_time ON attempts (attempted_at);
CREATE INDEX deliveries_entity ON deliveries (endpoint, entity, event_id) WHERE status = 'pending';
ALTER TABLE endpoints ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE endpoints ADD COLUMN paused_until REAL NOT NULL DEFAULT 0;
ALTER TABLE endpoints ADD COLUMN secret TEXT;
ALTER TABLE deliveries ADD COLUMN last_status INTEGER;
ALTER TABLE deliveries ADD COLUMN last_error TEXT

-- name: 3
-- API keys: only a hash of each key is kept.
CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,           -- public identifier, e.g. key_3f9a1c2b
    name         TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,       -- sha256 hex of the whole key
    prefix       TEXT NOT NULL,              -- first characters, to recognise a key in lists
    permissions  TEXT NOT NULL,              -- JSON list
    allow_ips    TEXT NOT NULL DEFAULT '[]', -- JSON list of CIDRs; empty = anywhere
    created_at   REAL NOT NULL,
    revoked_at   REAL,
    last_used_at REAL
)

-- name: 4
-- API usage per key and route (flushed from memory every few seconds).
CREATE TABLE api_usage (
    key_id       TEXT    NOT NULL,
    route        TEXT    NOT NULL,
    requests     INTEGER NOT NULL DEFAULT 0,
    last_used_at REAL    NOT NULL,
    PRIMARY KEY (key_id, route)
) WITHOUT ROWID

-- name: 5
-- What setup changed on the source (restored by `ct1-cdc detach`), what capture found
-- wrong with the mapping while running, and transactions an operator asked to skip.
CREATE TABLE source_changes (
    tbl          TEXT PRIMARY KEY,           -- schema.name as Postgres reports it
    schema_name  TEXT NOT NULL,
    table_name   TEXT NOT NULL,
    identity     TEXT NOT NULL,              -- replica identity before: d, n, i (f never changed)
    index_name   TEXT,                       -- for i: the identity index
    changed_at   REAL NOT NULL
);
CREATE TABLE mapping_problems (
    kind         TEXT NOT NULL,
    tbl          TEXT NOT NULL,
    rule         INTEGER,
    message      TEXT NOT NULL,
    fix          TEXT NOT NULL,
    since        REAL NOT NULL
);
CREATE TABLE skipped_transactions (
    xid          INTEGER PRIMARY KEY,
    requested_at REAL NOT NULL,
    skipped_at   REAL,                        -- when capture passed it by (null: still ahead)
    lsn          TEXT,                        -- the transaction's commit LSN, once skipped
    changes      INTEGER                      -- row changes it held
)

-- name: 6
-- The status history of one order (GET /orders/{id}) reads that order's captured status
-- changes by entity key.  Partial: appending any other event type costs nothing more.
CREATE INDEX events_status_history ON events (entity_key, id) WHERE type = 'order.status_changed'

-- name: 7
-- The state of derived events (cart.abandoned timers, analytics periods): a JSON value by
-- (kind, key), filed under a ref (a cart's customer, an item's cart) and a due time.  It is
-- written by capture in the same transaction as the events and the checkpoint.
CREATE TABLE derived_state (
    kind  TEXT NOT NULL,
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    ref   TEXT,
    due   REAL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE INDEX derived_state_ref ON derived_state (kind, ref) WHERE ref IS NOT NULL;
CREATE INDEX derived_state_due ON derived_state (kind, due) WHERE due IS NOT NULL

-- name: 8
-- Backfills (ct1-cdc backfill, setup --backfill, recover): one row per table to read.
-- Capture writes a job's progress in the same commit as the chunk's events, so a restart
-- goes on after the last chunk it committed; other processes request and cancel.
CREATE TABLE backfills (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    request      INTEGER NOT NULL,            -- the id of the first job of the same request
    tbl          TEXT    NOT NULL,            -- schema.name as the mapping names it
    condition    TEXT,                        -- --where: an SQL condition on the table's rows
    rate         REAL    NOT NULL DEFAULT 0,  -- rows a second at most (0: as fast as it goes)
    reason       TEXT    NOT NULL,            -- cli | setup | recover
    state        TEXT    NOT NULL DEFAULT 'queued',  -- queued | running | done | cancelled | failed
    after_key    TEXT,                        -- JSON list: the key of the last row sent
    reread       TEXT,                        -- JSON list of keys to read again (changed unseen)
    rows_done    INTEGER NOT NULL DEFAULT 0,  -- rows read so far
    events       INTEGER NOT NULL DEFAULT 0,  -- events they gave (rows the rules pass)
    total        INTEGER,                     -- rows to read, when counted
    error        TEXT,
    cancel_requested_at REAL,
    created_at   REAL    NOT NULL,
    started_at   REAL,
    updated_at   REAL    NOT NULL,
    finished_at  REAL
);
CREATE INDEX backfills_active ON backfills (id) WHERE state IN ('queued', 'running')

-- name: 9
-- Capture appends events only (docs/design-delivery-cursors.md, phase A). Each endpoint
-- has a cursor: the last event for which the dispatcher has made its delivery rows, from
-- the routes (which event types go to which endpoint, as capture's configuration says,
-- kept per type). Events whose writer chose the endpoints itself (a manual event narrowed
-- by systems, ct1.gap to every endpoint) get their rows at once and are marked routed.
-- An existing outbox's events already have their rows: every known endpoint starts at the
-- newest.
CREATE TABLE delivery_cursors (
    endpoint      TEXT    PRIMARY KEY,
    last_event_id INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE endpoint_routes (
    endpoint TEXT NOT NULL,
    type     TEXT NOT NULL,
    PRIMARY KEY (endpoint, type)
) WITHOUT ROWID;
ALTER TABLE events ADD COLUMN routed INTEGER NOT NULL DEFAULT 0;
INSERT INTO delivery_cursors (endpoint, last_event_id)
SELECT name, coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0) FROM endpoints

-- name: 10
-- No delivery row for a first-try success (docs/design-delivery-cursors.md, phase B).
-- Each endpoint's cursor now means: every event up to it that the endpoint takes was
-- either delivered on its first attempt (recorded in attempt_batches, below) or has a
-- delivery row (a failure, a retry, a replay, or queued behind one of its entity).
-- A batch of first-try successes is one row: the events, when the first was sent, the
-- HTTP status they all got, and the median and longest duration.
CREATE TABLE attempt_batches (
    id             INTEGER PRIMARY KEY,
    endpoint       TEXT    NOT NULL,
    first_event_id INTEGER NOT NULL,
    last_event_id  INTEGER NOT NULL,
    attempted_at   REAL    NOT NULL,        -- the batch's first attempt
    status         INTEGER NOT NULL,        -- the HTTP status of every attempt in it
    count          INTEGER NOT NULL,
    median_ms      REAL    NOT NULL,
    max_ms         REAL    NOT NULL,
    event_ids      TEXT    NOT NULL,        -- JSON array of the events, ascending
    generation     INTEGER NOT NULL DEFAULT 0  -- the endpoint's cursor generation then
);
-- A batch spans at most 10,000 ids (deliveries.BATCH_SPAN), so the batch holding an event
-- is found in a short range of this index.
CREATE INDEX attempt_batches_events ON attempt_batches (first_event_id);
CREATE INDEX attempt_batches_time ON attempt_batches (attempted_at);
-- `outbox replay --from` moves a cursor back and counts a generation, so a running
-- dispatcher notices and never writes its older cursor over the new one.
ALTER TABLE delivery_cursors ADD COLUMN generation INTEGER NOT NULL DEFAULT 0

-- name: 11
-- The dead deliveries, found without reading every row: the listings, and on the JetStream
-- backend the dispatch node sharing them every second (outbox/jetstream_shared.py).
CREATE INDEX deliveries_dead ON deliveries (endpoint, event_id) WHERE status = 'dead'

-- name: 12
-- A delivery made due again by an operator (`outbox replay --event`/`--dead`): on the
-- JetStream backend the node taking its partition over keeps it (the rows it drops at a
-- take are those the previous holder settled), so it goes out in its entity's order.
ALTER TABLE deliveries ADD COLUMN replayed INTEGER NOT NULL DEFAULT 0

-- name: 13
-- The endpoints a writer chose for an event itself (a manual event narrowed by `systems`),
-- as a JSON array; NULL for the rest. On the JetStream backend every node's copy makes
-- the event's rows from it, and a node taking a partition over makes no row for an
-- endpoint the event was not sent to.
ALTER TABLE events ADD COLUMN endpoints TEXT
