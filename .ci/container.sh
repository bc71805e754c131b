#!/usr/bin/env bash
# CI step: the container images, built offline and tested. Runs as root on Debian 12 with no
# image registry reachable: installs podman, buildah and runc from Debian (when missing), builds
# the release binaries, builds localhost/concord and localhost/concord-shop from them with
# buildah (deploy/image/build.sh, FROM scratch), checks that the Containerfile gives the same
# images (deploy/image/containerfile-check.sh, on stand-in base images), and tests the images with
# podman (deploy/image/test.sh). Prints how long each part took.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

times=()
step_start=0
begin() { echo "ci: container: $1"; step_name=$1; step_start=$EPOCHREALTIME; }
end() {
  local ms=$(( (${EPOCHREALTIME/./} - ${step_start/./}) / 1000 ))
  times+=("$(printf '%-28s %6d.%01d s' "$step_name" $((ms / 1000)) $((ms % 1000 / 100)))")
}
report() {
  local rc=$?
  echo "ci: container: times"
  for t in "${times[@]}"; do echo "  $t"; done
  [ "$rc" -eq 0 ] || echo "ci: container: failed in: ${step_name:-?}"
}
trap report EXIT

missing=()
for tool in podman buildah runc curl python3; do # each the name of its Debian package too
  command -v "$tool" >/dev/null || missing+=("$tool")
done
[ -s /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
begin "apt install (${#missing[@]} missing)"
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
end
podman --version
buildah --version

begin "cargo build --release"
cargo build --release -p concord-server -p concord-shop --locked
end
bin_dir="${CARGO_TARGET_DIR:-target}/release"

begin "image build (buildah)"
deploy/image/build.sh "$bin_dir"
end

begin "Containerfile check"
deploy/image/containerfile-check.sh "$bin_dir"
end

begin "image test (podman)"
deploy/image/test.sh "$bin_dir"
end
