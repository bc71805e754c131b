#!/usr/bin/env bash
# Concord's role and database, on the first start of an empty data directory (the postgres
# image runs /docker-entrypoint-initdb.d/*.sh as the superuser). The password comes from a
# mounted Secret file and reaches psql through its environment (\getenv), never a command line.
set -euo pipefail
# compose.yaml passes the password as CONCORD_DB_PASSWORD instead.
if [ -z "${CONCORD_DB_PASSWORD:-}" ]; then
  secrets=${CONCORD_INITDB_SECRETS:-/run/secrets/concord-database}
  # Exactly the file's bytes (a trailing newline too), as PGPASSWORD gets them from the Secret.
  CONCORD_DB_PASSWORD=$(cat "$secrets/password"; printf x)
  CONCORD_DB_PASSWORD=${CONCORD_DB_PASSWORD%x}
fi
export CONCORD_DB_PASSWORD
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<'SQL'
\getenv password CONCORD_DB_PASSWORD
CREATE ROLE concord LOGIN PASSWORD :'password';
CREATE DATABASE concord OWNER concord;
REVOKE ALL ON DATABASE concord FROM PUBLIC;
SQL
unset CONCORD_DB_PASSWORD
