-- The vault's own database (kept apart from the event store's so the card-data environment can
-- be segmented). Values are stored only as AES-256-GCM ciphertexts; times are unix microseconds.

-- The keyring: master key versions, each wrapped by the configured master key.
CREATE TABLE vault_master_keys (
    version    INTEGER PRIMARY KEY,
    nonce      BLOB    NOT NULL,
    wrapped    BLOB    NOT NULL,
    created_at INTEGER NOT NULL
);

-- One data key per subject (the default one has the subject ''), wrapped by a master key
-- version. Erasing a subject deletes its row; its token records stay and can no longer open.
CREATE TABLE vault_data_keys (
    id             BLOB    PRIMARY KEY,
    subject        TEXT    NOT NULL UNIQUE,
    master_version INTEGER NOT NULL,
    nonce          BLOB    NOT NULL,
    wrapped        BLOB    NOT NULL,
    created_at     INTEGER NOT NULL
);
-- Serves rotation: the keys still under an older version, in id order.
CREATE INDEX vault_data_keys_version ON vault_data_keys (master_version, id);

-- Token records. No foreign key to the data key on purpose: erasure removes the key alone.
CREATE TABLE vault_tokens (
    token       TEXT    PRIMARY KEY,
    kind        TEXT    NOT NULL,
    data_key_id BLOB    NOT NULL,
    nonce       BLOB    NOT NULL,
    ciphertext  BLOB    NOT NULL,
    blind_index BLOB,
    metadata    TEXT,
    expires_at  INTEGER,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;
-- Convergent tokens: one record per (data key, blind index).
CREATE UNIQUE INDEX vault_tokens_convergent ON vault_tokens (data_key_id, blind_index) WHERE blind_index IS NOT NULL;
CREATE INDEX vault_tokens_expiry ON vault_tokens (expires_at) WHERE expires_at IS NOT NULL;

-- Tokenized event fields per stream category: {"/pointer": {"type", "format"}}.
CREATE TABLE vault_rules (
    category   TEXT    PRIMARY KEY,
    fields     TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
);
