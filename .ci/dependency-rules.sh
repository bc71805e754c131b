#!/usr/bin/env bash
# The crate boundaries the architecture promises, checked on the resolved dependency graph:
# - the product (`concord-server`) does not depend on its example, its benchmarks or test helpers;
# - the client (`concord-client`) pulls in no database driver, web framework or vault crypto;
# - the kit (`concord-sdk`) compiles only what a service asks for: with `postgres` alone, no
#   Redis, NATS, axum, OpenTelemetry, SQLite or server core.
set -euo pipefail
cd "$(dirname "$0")/.."

fail=0
forbid() { # what, crates to forbid (regex), cargo tree arguments...
  local what=$1 pattern=$2; shift 2
  local tree found
  # cargo tree's own failure (a wrong package or feature) stops the script: only grep may find nothing.
  tree=$(cargo tree -e normal --prefix none "$@")
  found=$(printf '%s\n' "$tree" | awk '{print $1}' | grep -Ex "$pattern" | sort -u || true)
  if [ -n "$found" ]; then
    echo "dependency-rules: $what depends on: $(echo "$found" | tr '\n' ' ')" >&2
    fail=1
  else
    echo "dependency-rules: $what: ok"
  fi
}

forbid "concord-server" "concord-shop|concord-bench|tempfile" -p concord-server
forbid "concord-client" "sqlx|sqlx-core|redis|axum|aes-gcm|moka|concord-core" -p concord-client --all-features
forbid "concord-sdk (postgres)" "redis|moka|axum|async-nats|opentelemetry|libsqlite3-sys|aes-gcm|concord-core" \
  -p concord-sdk --no-default-features --features postgres
cargo check -q -p concord-sdk --no-default-features --features postgres
cargo check -q -p concord-sdk --no-default-features --features sqlite
cargo check -q -p concord-sdk --no-default-features
echo "dependency-rules: the kit builds with postgres alone, sqlite alone and no features"
exit $fail
