#!/usr/bin/env bash
# Builds the runtime images offline, without any registry: localhost/concord:VERSION and
# localhost/concord-shop:VERSION, FROM scratch with buildah, out of the release binaries, the
# shared libraries they link (found by ldd) with the dynamic loader, the CA certificates of this
# machine, and /etc/passwd, /etc/group and /etc/nsswitch.conf from deploy/image/rootfs. The image
# configuration (user, env, workdir, volume, port, health check, stop signal, labels) is the one
# the Containerfile gives; keep the two in step.
#
#   deploy/image/build.sh [BIN_DIR]     # BIN_DIR: where concord and concord-shop are
#                                       # (or CONCORD_BIN_DIR; default target/release)
#
# Environment: CONCORD_IMAGE_VERSION (default: the workspace version in Cargo.toml),
# CONCORD_IMAGE_SOURCE (org.opencontainers.image.source; default: the git remote "origin", without
# credentials), CONCORD_IMAGE_REVISION (default: git HEAD), SOURCE_DATE_EPOCH (fixes "created"
# and the layer timestamps), CONTAINERS_CONF (default: deploy/image/containers.conf).
# Needs buildah (Debian: apt-get install -y buildah), and root or a user namespace (rootless
# runs re-execute themselves under `buildah unshare`).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
# Docker format throughout: the OCI image format has no HEALTHCHECK.
export BUILDAH_FORMAT=docker

if [ "$(id -u)" != 0 ] && [ -z "${_CONCORD_IMAGE_UNSHARED:-}" ]; then
  # Mounting a container's filesystem needs root in a user namespace.
  export _CONCORD_IMAGE_UNSHARED=1
  exec buildah unshare "$0" "$@"
fi

bin_dir="${1:-${CONCORD_BIN_DIR:-$root/target/release}}"
bin_dir=$(cd "$bin_dir" 2>/dev/null && pwd) || { echo "build.sh: no directory $bin_dir" >&2; exit 2; }
for b in concord concord-shop; do
  [ -x "$bin_dir/$b" ] || {
    echo "build.sh: $bin_dir/$b is missing: cargo build --release -p concord-server -p concord-shop" >&2
    exit 2
  }
done
command -v buildah >/dev/null || { echo "build.sh: buildah is not installed (apt-get install -y buildah)" >&2; exit 2; }

workspace_version=$(awk '/^\[workspace\.package\]/{s=1;next} /^\[/{s=0} s&&$1=="version"{gsub(/"/,"",$3);print $3;exit}' "$root/Cargo.toml")
version="${CONCORD_IMAGE_VERSION:-$workspace_version}"
license=$(awk '/^\[workspace\.package\]/{s=1;next} /^\[/{s=0} s&&$1=="license"{gsub(/"/,"",$3);print $3;exit}' "$root/Cargo.toml")
built_version=$("$bin_dir/concord" --version | awk '{print $2}')
if [ "$built_version" != "$workspace_version" ]; then
  echo "build.sh: $bin_dir/concord is version $built_version, the workspace is $workspace_version: rebuild it" >&2
  exit 2
fi
revision="${CONCORD_IMAGE_REVISION:-$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)}"
# A remote URL may carry credentials (https://user:token@host/...): keep only scheme, host and path.
source_url="${CONCORD_IMAGE_SOURCE:-$(git -C "$root" remote get-url origin 2>/dev/null | sed -E 's#^(https?://)[^/@]*@#\1#' || true)}"
source_url="${source_url:-unknown}"
if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
  created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
  timestamp=(--timestamp "$SOURCE_DATE_EPOCH")
else
  created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  timestamp=()
fi

image="localhost/concord:$version"
shop_image="localhost/concord-shop:$version"
uid=65532
data=/var/lib/concord

stage=$(mktemp -d)
ctr=""
mnt_ctr=""
cleanup() {
  [ -n "$mnt_ctr" ] && buildah umount "$mnt_ctr" >/dev/null 2>&1 || true
  [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1 || true
  rm -rf "$stage"
}
trap cleanup EXIT

# --- the root filesystem, staged with its owners and modes ---------------------------------
install -d -m 0755 "$stage/usr/local/bin" "$stage/etc/ssl/certs" "$stage/var/lib"
install -m 0755 "$bin_dir/concord" "$stage/usr/local/bin/concord"
install -m 0644 "$here/rootfs/etc/passwd" "$here/rootfs/etc/group" "$here/rootfs/etc/nsswitch.conf" "$stage/etc/"
ca=/etc/ssl/certs/ca-certificates.crt
[ -s "$ca" ] || { echo "build.sh: $ca is missing (apt-get install -y ca-certificates)" >&2; exit 2; }
install -m 0644 "$ca" "$stage$ca"
install -d -m 1777 "$stage/tmp"
install -d -m 0700 -o "$uid" -g "$uid" "$stage$data" "$stage/home/nonroot"

# The libraries both binaries link, at the paths the loader looks for them, and the loader at the
# path the binaries name (PT_INTERP). The copies are the files, not the symlinks to them.
libs=$(for b in concord concord-shop; do
  out=$(ldd "$bin_dir/$b" 2>&1) || { echo "build.sh: ldd $b: $out" >&2; exit 2; }
  if grep -q 'not found' <<<"$out"; then echo "build.sh: $b links a library this machine lacks:" >&2; echo "$out" >&2; exit 2; fi
  awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$out"
done | sort -u)
for lib in $libs; do
  install -D -m 0755 "$(readlink -f "$lib")" "$stage$lib"
done

# --- the server image ------------------------------------------------------------------------
# Each setting here mirrors a line of the Containerfile's runtime stage.
common_config=(
  --user "$uid:$uid"
  --workingdir "$data"
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
  --env CONCORD_LISTEN=0.0.0.0:7400
  --env "CONCORD_DATABASE_URL=sqlite://$data/concord.db"
  --port 7400/tcp
  --volume "$data"
  --stop-signal SIGTERM
  # Exec form, as the Containerfile's HEALTHCHECK CMD [...]: buildah splits this into the words
  # of Test ["CMD", "/usr/local/bin/concord", ...] (it does not read a JSON array here).
  --healthcheck 'CMD /usr/local/bin/concord healthcheck --url http://127.0.0.1:7400'
  --healthcheck-interval 10s
  --healthcheck-timeout 5s
  --healthcheck-start-period 10s
  --healthcheck-retries 3
  --label "org.opencontainers.image.version=$version"
  --label "org.opencontainers.image.source=$source_url"
  --label "org.opencontainers.image.licenses=$license"
  --label "org.opencontainers.image.revision=$revision"
  --label "org.opencontainers.image.created=$created"
  --label "org.opencontainers.image.vendor=Concord"
)

# The images these replace, removed once the new ones are tagged (else they stay, untagged).
image_id() { { buildah images --quiet --no-trunc "$1" 2>/dev/null || true; } | head -n1; }
replaced=("$(image_id "$shop_image")" "$(image_id "$image")")

ctr=$(buildah from scratch)
mnt_ctr=$ctr
mnt=$(buildah mount "$ctr")
cp -a "$stage/." "$mnt/"
buildah umount "$ctr" >/dev/null
mnt_ctr=""
buildah config "${common_config[@]}" \
  --label org.opencontainers.image.title=concord \
  --label "org.opencontainers.image.description=Concord server: event store, saga orchestrator, two-phase-commit coordinator and tokenization vault" \
  --entrypoint '["/usr/local/bin/concord"]' \
  "$ctr"
buildah config --cmd '["serve"]' "$ctr"
buildah commit --quiet --format docker --identity-label=false "${timestamp[@]}" --rm "$ctr" "$image" >/dev/null
ctr=""

# --- the shop image: the server image plus the shop's binary ----------------------------------
ctr=$(buildah from "$image")
buildah config --cmd '' "$ctr" # the server's cmd is no argument of the shop's entrypoint
buildah copy --quiet --chown 0:0 --chmod 0755 "$ctr" "$bin_dir/concord-shop" /usr/local/bin/concord-shop >/dev/null
buildah config \
  --label org.opencontainers.image.title=concord-shop \
  --label "org.opencontainers.image.description=Concord reference shop (orders, inventory, payments, query, provider) and its fault-injection demo, with the concord server" \
  --entrypoint '["/usr/local/bin/concord-shop"]' \
  "$ctr"
buildah config --cmd '["demo"]' "$ctr"
buildah commit --quiet --format docker --identity-label=false "${timestamp[@]}" --rm "$ctr" "$shop_image" >/dev/null
ctr=""

# The old shop image first: it is a child of the old server image.
for old in "${replaced[@]}"; do
  if [ -n "$old" ] && [ "$old" != "$(image_id "$image")" ] && [ "$old" != "$(image_id "$shop_image")" ]; then
    buildah rmi "$old" >/dev/null 2>&1 || true # still used by a container: kept
  fi
done

size_of() { buildah images --format '{{.Size}}' "$1" 2>/dev/null | head -n1; }
echo "build.sh: built $image ($(size_of "$image")) and $shop_image ($(size_of "$shop_image"))"
echo "build.sh: from $bin_dir; libraries: ${libs//$'\n'/ }"
