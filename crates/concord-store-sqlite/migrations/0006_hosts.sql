-- Each participant host's flow-control state (limits, calls out, rate, breaker) as JSON text;
-- times are unix microseconds, as for sagas. A change runs in a `BEGIN IMMEDIATE` transaction on
-- the one write connection, so changes to a host apply one after the other.
CREATE TABLE participant_hosts (
    host       TEXT    PRIMARY KEY,
    state      TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;

-- The sagas waiting for a host to come back, woken (oldest parked first) when it does.
CREATE TABLE parked_sagas (
    host      TEXT    NOT NULL,
    saga_id   TEXT    NOT NULL,
    parked_at INTEGER NOT NULL,
    PRIMARY KEY (host, saga_id)
) WITHOUT ROWID;
-- Serves the look-up of the host a saga is parked on.
CREATE INDEX parked_sagas_by_saga ON parked_sagas (saga_id);
