-- The vault's own database (kept apart from the event store's so the card-data environment can
-- be segmented). Values are stored only as AES-256-GCM ciphertexts.

-- The keyring: master key versions, each wrapped by the configured master key.
CREATE TABLE concord_vault_master_keys (
    version    INTEGER     PRIMARY KEY,
    nonce      BYTEA       NOT NULL,
    wrapped    BYTEA       NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);

-- One data key per subject (the default one has the subject ''), wrapped by a master key
-- version. Erasing a subject deletes its row; its token records stay and can no longer open.
CREATE TABLE concord_vault_data_keys (
    id             UUID        PRIMARY KEY,
    subject        TEXT        NOT NULL UNIQUE,
    master_version INTEGER     NOT NULL,
    nonce          BYTEA       NOT NULL,
    wrapped        BYTEA       NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL
);
-- Serves rotation: the keys still under an older version, in id order.
CREATE INDEX concord_vault_data_keys_version ON concord_vault_data_keys (master_version, id);

-- Token records. No foreign key to the data key on purpose: erasure removes the key alone.
CREATE TABLE concord_vault_tokens (
    token       TEXT        PRIMARY KEY,
    kind        TEXT        NOT NULL,
    data_key_id UUID        NOT NULL,
    nonce       BYTEA       NOT NULL,
    ciphertext  BYTEA       NOT NULL,
    blind_index BYTEA,
    metadata    JSONB,
    expires_at  TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL
);
-- Convergent tokens: one record per (data key, blind index); concurrent inserts of the same
-- value wait on each other here and all but one find the winner's token.
CREATE UNIQUE INDEX concord_vault_tokens_convergent ON concord_vault_tokens (data_key_id, blind_index)
    WHERE blind_index IS NOT NULL;
CREATE INDEX concord_vault_tokens_expiry ON concord_vault_tokens (expires_at) WHERE expires_at IS NOT NULL;

-- Tokenized event fields per stream category: {"/pointer": {"type", "format"}}.
CREATE TABLE concord_vault_rules (
    category   TEXT        PRIMARY KEY,
    fields     JSONB       NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
