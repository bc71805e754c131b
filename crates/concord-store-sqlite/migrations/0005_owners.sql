-- Who may change a consumer group's checkpoints or a saga definition: the API key name that
-- first changed it (admin keys may change anything).
CREATE TABLE owners (
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    owner      TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
