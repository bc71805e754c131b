#!/usr/bin/env bash
# Creates the Secrets an overlay needs, each with fresh random values, in its namespace. A
# Secret that exists already is left as it is (delete it first to replace it), so running this
# again never changes a key that data was written under.
#
#   deploy/kubernetes/create-secrets.sh embedded|scale-out|shop [-n NAMESPACE] [--print]
#
# --print writes the Secrets as YAML to stdout instead (to seal or store them elsewhere, e.g.
# `| kubeseal -o yaml`); nothing is sent to a cluster. The values never appear on a command
# line: kubectl reads them from files in a private temporary directory, removed at once.
#
# Which Secret holds what (README.md, "Secrets"):
#   concord-secrets     concord.toml (admin_key; with the shop also tx_participant_token and
#                       saga_secrets.shop_token), vault-master-key (32 bytes, base64)
#   concord-database    password of the PostgreSQL role concord           (scale-out, shop)
#   postgres-superuser  password of the PostgreSQL superuser postgres     (scale-out, shop)
#   concord-backends    nats-password, redis-password                     (scale-out, shop)
#   shop-secrets        token (the services' bearer token, also the saga secret shop_token),
#                       tx-token (the 2PC token), provider-key            (shop)
#   shop-database       orders, inventory, payments, query, provider: the services' PostgreSQL
#                       passwords                                         (shop)
# The shop's Concord API keys (Secret shop-concord-keys) are made by shop-bootstrap.sh once
# Concord runs, since only Concord issues API keys.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

overlay=""; namespace=""; print=false
while [ $# -gt 0 ]; do
  case "$1" in
    embedded|scale-out|shop) overlay=$1 ;;
    -n|--namespace) namespace=${2:?}; shift ;;
    --print) print=true ;;
    -h|--help) usage ;;
    *) echo "create-secrets.sh: unknown argument $1" >&2; usage ;;
  esac
  shift
done
[ -n "$overlay" ] || usage
if [ -z "$namespace" ]; then
  if [ "$overlay" = shop ]; then namespace=concord-shop; else namespace=concord; fi
fi

# Hex, so a password is safe in a URL as it is; the vault's master key is 32 bytes in base64.
random_hex() { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; }
random_key() { head -c 32 /dev/urandom | base64 | tr -d '\n'; }

# secret NAME KEY=VALUE...: the values go to kubectl through files, never argv.
secret() {
  local name=$1; shift
  if ! $print && kubectl -n "$namespace" get secret "$name" >/dev/null 2>&1; then
    echo "create-secrets.sh: $namespace/$name exists, left as it is" >&2
    return 0
  fi
  local dir
  dir=$(mktemp -d)
  chmod 700 "$dir"
  trap 'rm -rf "$dir"' RETURN
  local args=() pair
  for pair in "$@"; do
    printf '%s' "${pair#*=}" > "$dir/${pair%%=*}"
    args+=("--from-file=${pair%%=*}=$dir/${pair%%=*}")
  done
  if $print; then
    kubectl create secret generic "$name" -n "$namespace" "${args[@]}" --dry-run=client -o yaml
    echo "---"
  else
    kubectl create secret generic "$name" -n "$namespace" "${args[@]}" >/dev/null
    echo "create-secrets.sh: created $namespace/$name" >&2
  fi
}

if ! $print && ! kubectl get namespace "$namespace" >/dev/null 2>&1; then
  kubectl create namespace "$namespace" >/dev/null
  echo "create-secrets.sh: created namespace $namespace" >&2
fi

admin_key=$(random_hex)
shop_token=$(random_hex)
tx_token=$(random_hex)
toml="# Concord's secret settings (concord serve --config). Every other setting is a CONCORD_*
# variable of the ConfigMap concord-env, which wins over this file.
admin_key = \"$admin_key\"
"
if [ "$overlay" = shop ]; then
  toml+="
# Sent as the bearer token on every 2PC call, to the hosts of tx_participant_token_hosts only.
tx_participant_token = \"$tx_token\"

# The shop's service token, which the place-order saga sends as {{secrets.shop_token}}.
[saga_secrets.shop_token]
value = \"$shop_token\"
hosts = [\"orders:8080\", \"inventory:8080\", \"payments:8080\"]
"
fi
secret concord-secrets "concord.toml=$toml" "vault-master-key=$(random_key)"

if [ "$overlay" != embedded ]; then
  secret concord-database "password=$(random_hex)"
  secret postgres-superuser "password=$(random_hex)"
  secret concord-backends "nats-password=$(random_hex)" "redis-password=$(random_hex)"
fi

if [ "$overlay" = shop ]; then
  secret shop-secrets "token=$shop_token" "tx-token=$tx_token" "provider-key=$(random_hex)"
  secret shop-database "orders=$(random_hex)" "inventory=$(random_hex)" "payments=$(random_hex)" \
    "query=$(random_hex)" "provider=$(random_hex)"
fi
