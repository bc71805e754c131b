-- The `Idempotency-Key` records live in the service kit's table `concord_idempotency` (the one
-- store of the server and of services, `concord_sdk::idempotency::sqlite`), whose columns are the
-- same: the table is renamed, so records in flight or kept for replay survive the upgrade. The
-- kit creates its own index on it.
ALTER TABLE idempotency RENAME TO concord_idempotency;
DROP INDEX IF EXISTS idempotency_by_expiry;
