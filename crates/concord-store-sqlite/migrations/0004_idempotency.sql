-- The `Idempotency-Key` records live in the service kit's table `concord_idempotency` (the one
-- store of the server and of services, created by `concord_sdk::idempotency::sqlite`).
DROP TABLE IF EXISTS idempotency;
