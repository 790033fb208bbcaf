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

CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY,
    event_id        INTEGER NOT NULL REFERENCES events (id),
    endpoint        TEXT    NOT NULL,
    entity          TEXT    NOT NULL,       -- object:key, the unit of ordering
    status          TEXT    NOT NULL DEFAULT 'pending',  -- pending | delivered | dead
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL    NOT NULL DEFAULT 0,
    UNIQUE (event_id, endpoint)
);
CREATE INDEX deliveries_due ON deliveries (status, endpoint, next_attempt_at);

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
