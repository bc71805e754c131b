-- The event log. `position` is assigned by the single writer, in commit order.
CREATE TABLE events (
    position    INTEGER PRIMARY KEY,
    id          BLOB    NOT NULL UNIQUE,
    stream      TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    category    TEXT    NOT NULL,
    stream_hash INTEGER NOT NULL,
    event_type  TEXT    NOT NULL,
    data        TEXT    NOT NULL,
    metadata    TEXT    NOT NULL,
    recorded_at TEXT    NOT NULL,
    UNIQUE (stream, version)
);
CREATE INDEX events_by_category ON events (category, position);

CREATE TABLE checkpoints (
    grp        TEXT    NOT NULL,
    member     INTEGER NOT NULL,
    position   INTEGER NOT NULL,
    updated_at TEXT    NOT NULL,
    PRIMARY KEY (grp, member)
);

CREATE TABLE api_keys (
    id         BLOB PRIMARY KEY,
    name       TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    hash       BLOB NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);

-- Idempotency records; times are unix milliseconds so comparisons are numeric.
CREATE TABLE idempotency (
    owner        BLOB    NOT NULL,
    key          TEXT    NOT NULL,
    fingerprint  BLOB    NOT NULL,
    status       INTEGER,
    content_type TEXT,
    body         BLOB,
    locked_until INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX idempotency_by_expiry ON idempotency (expires_at);
