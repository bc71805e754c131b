CREATE TABLE concord_saga_definitions (
    name       TEXT        NOT NULL,
    version    BIGINT      NOT NULL,
    spec       JSONB       NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE concord_sagas (
    id          TEXT        PRIMARY KEY,
    definition  TEXT        NOT NULL,
    version     BIGINT      NOT NULL,
    input       JSONB       NOT NULL,
    status      TEXT        NOT NULL,
    next_run_at TIMESTAMPTZ,
    lease_owner UUID,
    lease_until TIMESTAMPTZ,
    log_version BIGINT      NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);
-- Serves the claim: only rows that will run on their own, oldest due first. Finished sagas
-- leave it, so it stays as small as the live work.
CREATE INDEX concord_sagas_due ON concord_sagas (next_run_at) WHERE next_run_at IS NOT NULL;
