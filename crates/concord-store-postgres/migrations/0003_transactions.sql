-- Rows of the 2PC coordinator's transactions, keyed by the generated xid.
CREATE TABLE concord_transactions (
    xid         TEXT        PRIMARY KEY,
    -- The logged decision; NULL while phase 1 runs.
    outcome     TEXT        CHECK (outcome IN ('committed', 'aborted')),
    pending     BOOLEAN     NOT NULL,
    next_run_at TIMESTAMPTZ,
    lease_owner UUID,
    lease_until TIMESTAMPTZ,
    log_version BIGINT      NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);
-- Serves the claim: only rows with work left, oldest due first. Finished transactions leave it,
-- so it stays as small as the live work.
CREATE INDEX concord_transactions_due ON concord_transactions (next_run_at) WHERE next_run_at IS NOT NULL;
-- Serves the in-doubt metrics (count and oldest of the pending rows), as small as the in-doubt set.
CREATE INDEX concord_transactions_pending ON concord_transactions (created_at) WHERE pending;
