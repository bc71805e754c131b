-- One row that every writer locks for the length of its transaction: the serialization point
-- that makes positions commit in order (see src/events.rs).
CREATE TABLE concord_log_head (
    id            SMALLINT PRIMARY KEY CHECK (id = 1),
    last_position BIGINT   NOT NULL
);
INSERT INTO concord_log_head (id, last_position) VALUES (1, 0);

CREATE TABLE concord_events (
    position    BIGINT      PRIMARY KEY,
    id          UUID        NOT NULL UNIQUE,
    stream      TEXT        NOT NULL,
    version     BIGINT      NOT NULL,
    category    TEXT        NOT NULL,
    stream_hash BIGINT      NOT NULL,
    event_type  TEXT        NOT NULL,
    data        JSONB       NOT NULL,
    metadata    JSONB       NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    UNIQUE (stream, version)
);
CREATE INDEX concord_events_by_category ON concord_events (category, position);

CREATE TABLE concord_checkpoints (
    grp        TEXT        NOT NULL,
    member     BIGINT      NOT NULL,
    position   BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (grp, member)
);

CREATE TABLE concord_api_keys (
    id         UUID        PRIMARY KEY,
    name       TEXT        NOT NULL,
    scopes     TEXT[]      NOT NULL,
    hash       BYTEA       NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL,
    revoked_at TIMESTAMPTZ
);

-- Idempotency records; times are unix milliseconds, the same as on SQLite.
CREATE TABLE concord_idempotency (
    owner        UUID   NOT NULL,
    key          TEXT   NOT NULL,
    fingerprint  BYTEA  NOT NULL,
    status       INTEGER,
    content_type TEXT,
    body         BYTEA,
    locked_until BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX concord_idempotency_by_expiry ON concord_idempotency (expires_at);
