-- Serves retention: finished rows (no longer due) by when they last changed, so removing the
-- old ones reads only them.
CREATE INDEX concord_sagas_finished ON concord_sagas (updated_at) WHERE next_run_at IS NULL;
CREATE INDEX concord_transactions_finished ON concord_transactions (updated_at) WHERE next_run_at IS NULL;
