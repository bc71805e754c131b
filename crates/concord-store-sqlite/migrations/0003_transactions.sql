-- Rows of the 2PC coordinator's transactions; times are unix microseconds, as for sagas.
-- Keyed by the generated xid: WITHOUT ROWID stores the row in the xid b-tree, so the
-- coordinator's update by xid is one lookup.
CREATE TABLE transactions (
    xid         TEXT    PRIMARY KEY,
    -- The logged decision; NULL while phase 1 runs.
    outcome     TEXT    CHECK (outcome IN ('committed', 'aborted')),
    pending     INTEGER NOT NULL CHECK (pending IN (0, 1)),
    next_run_at INTEGER,
    lease_owner BLOB,
    lease_until INTEGER,
    log_version INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) WITHOUT ROWID;
-- Serves the claim: only rows with work left, oldest due first.
CREATE INDEX transactions_due ON transactions (next_run_at) WHERE next_run_at IS NOT NULL;
-- Serves the in-doubt metrics (count and oldest of the pending rows). The query must say
-- `WHERE pending` exactly for SQLite to pick this partial index.
CREATE INDEX transactions_pending ON transactions (created_at) WHERE pending;
