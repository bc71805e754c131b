-- Saga definitions and saga rows; times are unix microseconds so comparisons are numeric and
-- values round-trip exactly.
CREATE TABLE saga_definitions (
    name       TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    spec       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (name, version)
) WITHOUT ROWID;

-- Keyed by the caller's id: WITHOUT ROWID stores the row in the id b-tree, so the runner's
-- update by id is one lookup.
CREATE TABLE sagas (
    id          TEXT    PRIMARY KEY,
    definition  TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    input       TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    next_run_at INTEGER,
    lease_owner BLOB,
    lease_until INTEGER,
    log_version INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) WITHOUT ROWID;
-- Serves the claim: only rows that will run on their own, oldest due first.
CREATE INDEX sagas_due ON sagas (next_run_at) WHERE next_run_at IS NOT NULL;
