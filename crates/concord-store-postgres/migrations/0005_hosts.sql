-- Each participant host's flow-control state (limits, calls out, rate, breaker), shared by every
-- node: a change locks the host's row, so changes from any node apply one after the other.
CREATE TABLE concord_participant_hosts (
    host       TEXT        PRIMARY KEY,
    state      JSONB       NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

-- The sagas waiting for a host to come back, woken (oldest parked first) when it does.
CREATE TABLE concord_parked_sagas (
    host      TEXT        NOT NULL,
    saga_id   TEXT        NOT NULL,
    parked_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (host, saga_id)
);
-- Serves the look-up of the host a saga is parked on.
CREATE INDEX concord_parked_sagas_by_saga ON concord_parked_sagas (saga_id);
