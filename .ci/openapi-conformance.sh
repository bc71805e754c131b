#!/usr/bin/env bash
# The OpenAPI document against the server it describes: a fresh `concord serve` (SQLite, in a
# temporary folder) is fuzzed with schema-valid requests by schemathesis, and every answer is
# checked: no server error, every status code and content type documented, every body valid
# against its schema, no schema-valid request refused (the exceptions, each with its reason, are
# in .ci/schemathesis.toml). Bounded: a fixed number of examples per operation and a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
EXAMPLES=${CONCORD_OPENAPI_EXAMPLES:-25}
venv=target/openapi-venv
if [ ! -x "$venv/bin/st" ] || ! "$venv/bin/st" --version | grep -q "$SCHEMATHESIS_VERSION"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo build --quiet -p concord-server
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
key="openapi-conformance-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
bin=$(cd "${CARGO_TARGET_DIR:-target}/debug" && pwd)/concord
# A clean environment in a folder of its own: no CONCORD_* setting or ./concord.toml of the caller's
# leaks into the server under test.
(cd "$dir" && exec env -i PATH="$PATH" CONCORD_ADMIN_KEY="$key" \
  CONCORD_VAULT_MASTER_KEY="$(head -c 32 /dev/urandom | base64)" \
  "$bin" serve --listen "127.0.0.1:$port" --database-url "sqlite://$dir/concord.db") > "$dir/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$dir"' EXIT
if python3 - "$port" <<'PY'
import sys, time, urllib.request
for _ in range(120):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=2)
        sys.exit(0)
    except Exception:
        time.sleep(0.5)
sys.exit("openapi-conformance: the server did not answer /ready")
PY
then :; else
  tail -n 50 "$dir/server.log" >&2
  exit 1
fi

status=0
timeout 1200 "$venv/bin/st" --config-file .ci/schemathesis.toml run "http://127.0.0.1:$port/v1/openapi.json" \
  -H "Authorization: Bearer $key" --mode positive --max-examples "$EXAMPLES" --seed 1 --no-color \
  > "$dir/st.log" 2>&1 || status=$?
sed -n '/SUMMARY/,$p' "$dir/st.log"
if [ $status -ne 0 ]; then
  cat "$dir/st.log"
  echo "openapi-conformance: failed (exit $status); the server's log:" >&2
  tail -n 50 "$dir/server.log" >&2
fi
exit $status
