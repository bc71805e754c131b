#!/usr/bin/env bash
# Sets up the reference shop on a running Concord, once: puts the place-order saga definition
# (overlays/shop/place-order.json) and creates the services' API keys, each with only the
# scopes its service needs. Only Concord issues API keys, so this runs after Concord is up and
# before the shop's services can start.
#
# Kubernetes (the shop overlay): port-forwards to the Service concord, reads the admin key from
# the Secret concord-secrets, and creates the Secret shop-concord-keys; the services, waiting
# for it, then start.
#
#   deploy/kubernetes/shop-bootstrap.sh kubernetes [-n NAMESPACE]
#
# Anywhere else (compose.yaml): prints the keys as KEY=value lines for an env file.
#
#   CONCORD_ADMIN_KEY=... deploy/kubernetes/shop-bootstrap.sh env [--url URL] >> .env
#
# Needs curl (and kubectl for the first form). The admin key never appears on a command line.
# With the tls component, set SHOP_BOOTSTRAP_CURL_ARGS="--cacert ca.crt --cert tls.crt --key
# tls.key" and --url https://... .
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
definition="$here/overlays/shop/place-order.json"
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

mode=""; namespace=concord-shop; url=""
while [ $# -gt 0 ]; do
  case "$1" in
    kubernetes|env) mode=$1 ;;
    -n|--namespace) namespace=${2:?}; shift ;;
    --url) url=${2:?}; shift ;;
    -h|--help) usage ;;
    *) echo "shop-bootstrap.sh: unknown argument $1" >&2; usage ;;
  esac
  shift
done
[ -n "$mode" ] || usage
read -r -a curl_extra <<< "${SHOP_BOOTSTRAP_CURL_ARGS:-}"

forward_pid=""
cleanup() { if [ -n "$forward_pid" ]; then kill "$forward_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT

if [ "$mode" = kubernetes ]; then
  if kubectl -n "$namespace" get secret shop-concord-keys >/dev/null 2>&1; then
    echo "shop-bootstrap.sh: $namespace/shop-concord-keys exists; delete it (and revoke its keys) to make new ones" >&2
    exit 0
  fi
  kubectl -n "$namespace" rollout status deployment/concord --timeout=300s >&2
  port=${SHOP_BOOTSTRAP_PORT:-17400}
  kubectl -n "$namespace" port-forward service/concord "$port:7400" >/dev/null &
  forward_pid=$!
  scheme=http
  [ -n "${SHOP_BOOTSTRAP_CURL_ARGS:-}" ] && scheme=https
  url=${url:-$scheme://127.0.0.1:$port}
  CONCORD_ADMIN_KEY=$(kubectl -n "$namespace" get secret concord-secrets -o jsonpath='{.data.concord\.toml}' \
    | base64 -d | sed -n 's/^admin_key *= *"\(.*\)"$/\1/p')
fi
url=${url:-http://127.0.0.1:7400}
: "${CONCORD_ADMIN_KEY:?set CONCORD_ADMIN_KEY to the admin key of Concord}"

# call METHOD PATH [BODY-FILE]: the admin key reaches curl through its config on stdin.
call() {
  local method=$1 path=$2 body=${3:-}
  local args=(--silent --show-error --fail-with-body --config - -X "$method" "${curl_extra[@]}")
  if [ -n "$body" ]; then args+=(-H "Content-Type: application/json" --data-binary "@$body"); fi
  printf 'header = "Authorization: Bearer %s"\n' "$CONCORD_ADMIN_KEY" | curl "${args[@]}" "$url$path"
}

for _ in $(seq 1 60); do
  if curl --silent --fail "${curl_extra[@]}" "$url/ready" >/dev/null 2>&1; then break; fi
  sleep 1
done

call PUT /v1/saga-definitions/place-order "$definition" >/dev/null
echo "shop-bootstrap.sh: saga definition place-order put" >&2

keys=$(mktemp)
chmod 600 "$keys"
trap 'cleanup; rm -f "$keys"' EXIT
# create VAR NAME SCOPE...: a key named NAME, its value printed as VAR=value.
create() {
  local var=$1 name=$2; shift 2
  local body scopes answer key
  scopes=$(printf '"%s",' "$@")
  body=$(mktemp)
  printf '{"name": "%s", "scopes": [%s]}' "$name" "${scopes%,}" > "$body"
  answer=$(call POST /v1/keys "$body")
  rm -f "$body"
  key=$(printf '%s' "$answer" | tr -d '\n' | sed -n 's/.*"key" *: *"\([^"]*\)".*/\1/p')
  [ -n "$key" ] || { echo "shop-bootstrap.sh: no key in Concord's answer for $name" >&2; exit 1; }
  printf '%s=%s\n' "$var" "$key" >> "$keys"
  echo "shop-bootstrap.sh: key $name created" >&2
}
create SHOP_ORDERS_CONCORD_KEY shop-orders events:read events:write sagas:read sagas:write \
  vault:tokenize vault:detokenize-masked:card
create SHOP_INVENTORY_CONCORD_KEY shop-inventory events:read events:write tx:read
create SHOP_QUERY_CONCORD_KEY shop-query events:read
create SHOP_PROVIDER_CONCORD_KEY card-provider vault:detokenize:card

if [ "$mode" = kubernetes ]; then
  kubectl -n "$namespace" create secret generic shop-concord-keys --from-env-file="$keys" >/dev/null
  echo "shop-bootstrap.sh: created $namespace/shop-concord-keys" >&2
else
  cat "$keys"
fi
