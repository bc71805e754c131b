#!/usr/bin/env bash
# The reference shop's databases, each service its own role and database (inventory: one per
# warehouse), on the first start of an empty data directory. Passwords come from the mounted
# Secret shop-database and reach psql through its environment (\getenv), never a command line.
set -euo pipefail
secrets=${SHOP_INITDB_SECRETS:-/run/secrets/shop-database}
create() { # role, databases...
  local role=$1; shift
  if [ -n "${SHOP_DB_PASSWORD_ALL:-}" ]; then
    # compose.yaml: one password for every role, on a laptop.
    SHOP_DB_PASSWORD=$SHOP_DB_PASSWORD_ALL
  else
    # Exactly the file's bytes (a trailing newline too), as PGPASSWORD gets them from the Secret.
    SHOP_DB_PASSWORD=$(cat "$secrets/$role"; printf x)
    SHOP_DB_PASSWORD=${SHOP_DB_PASSWORD%x}
  fi
  export SHOP_DB_PASSWORD
  {
    printf '%s\n' '\getenv password SHOP_DB_PASSWORD'
    printf 'CREATE ROLE %s LOGIN PASSWORD :'"'"'password'"'"';\n' "$role"
    for db in "$@"; do
      printf 'CREATE DATABASE %s OWNER %s;\n' "$db" "$role"
      printf 'REVOKE ALL ON DATABASE %s FROM PUBLIC;\n' "$db"
    done
  } | psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres
  unset SHOP_DB_PASSWORD
}
create orders orders
create inventory inventory_north inventory_south
create payments payments
create query query
create provider provider
