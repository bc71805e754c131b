-- Serves retention: finished rows (no longer due) by when they last changed, so removing the
-- old ones reads only them. The query must say `next_run_at IS NULL` for SQLite to pick these.
CREATE INDEX sagas_finished ON sagas (updated_at) WHERE next_run_at IS NULL;
CREATE INDEX transactions_finished ON transactions (updated_at) WHERE next_run_at IS NULL;
