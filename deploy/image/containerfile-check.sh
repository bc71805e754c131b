#!/usr/bin/env bash
# Checks the Containerfile where no registry is reachable: builds it with `buildah bud` on two
# stand-in base images made from this machine's files, then holds the result against the offline
# images of build.sh and runs test.sh on it. What it shows: the Containerfile builds (every COPY,
# owner and mode, the stage order, the targets) and gives the configuration and files of
# build.sh's images. What it cannot show: the real bases (rust:1.95-bookworm compiling,
# distroless cc-debian12's own files) and Docker's BuildKit, which it does not run.
#   - the rust stand-in: dash, coreutils and a `cargo` that checks its arguments and hands over
#     the release binaries from BIN_DIR instead of compiling;
#   - the distroless stand-in: glibc and libgcc_s of Debian 12, CA certificates, /tmp (1777),
#     /home/nonroot and /var/lib/dpkg, passwd and group with nonroot 65532, user 65532.
#
#   deploy/image/containerfile-check.sh [BIN_DIR]   # after build.sh, before test.sh removes its images
#
# Ends with "containerfile: N passed, N failed" from test.sh; exits 1 when anything differs.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
export BUILDAH_FORMAT=docker
bin_dir="${1:-${CONCORD_BIN_DIR:-$root/target/release}}"
bin_dir=$(cd "$bin_dir" && pwd)
version=$(awk '/^\[workspace\.package\]/{s=1;next} /^\[/{s=0} s&&$1=="version"{gsub(/"/,"",$3);print $3;exit}' "$root/Cargo.toml")
rust_standin=localhost/concord-standin-rust:check
base_standin=localhost/concord-standin-distroless:check
tag=containerfile-check
# The source label as build.sh derives it, so the two images are compared like for like.
source_url="${CONCORD_IMAGE_SOURCE:-$(git -C "$root" remote get-url origin 2>/dev/null | sed -E 's#^(https?://)[^/@]*@#\1#' || true)}"
source_url="${source_url:-unknown}"

ctr=""
cleanup() {
  local rc=$?
  [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1 || true
  buildah rmi -f "localhost/concord-shop:$tag" "localhost/concord:$tag" "$rust_standin" "$base_standin" >/dev/null 2>&1 || true
  exit "$rc"
}
trap cleanup EXIT

copy_with_libs() { # MOUNT FILE...: each file and the libraries it links, at their paths
  local m=$1 f lib
  shift
  for f in "$@"; do
    install -D -m 0755 "$(readlink -f "$f")" "$m$f"
    for lib in $(ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
      install -D -m 0755 "$(readlink -f "$lib")" "$m$lib"
    done
  done
}

echo "containerfile-check: stand-in base images"
ctr=$(buildah from scratch)
m=$(buildah mount "$ctr")
copy_with_libs "$m" /bin/dash /usr/bin/install /bin/cp /bin/mkdir
ln -s dash "$m/bin/sh"
install -d -m 1777 "$m/tmp"
install -D -m 0755 "$bin_dir/concord" "$m/prebuilt/concord"
install -D -m 0755 "$bin_dir/concord-shop" "$m/prebuilt/concord-shop"
install -D -m 0755 /dev/stdin "$m/usr/local/cargo/bin/cargo" <<'EOF'
#!/bin/sh
# Stand-in cargo: the arguments the Containerfile must pass, the sources it must have copied.
echo "stand-in cargo $*" >&2
case " $* " in *" build --release --locked -p concord-server -p concord-shop "*) ;; *) echo "unexpected: cargo $*" >&2; exit 1 ;; esac
for f in Cargo.toml Cargo.lock crates/concord-server/Cargo.toml examples/shop/Cargo.toml; do
  [ -f "$f" ] || { echo "missing from the build context: $f" >&2; exit 1; }
done
mkdir -p target/release && cp /prebuilt/concord /prebuilt/concord-shop target/release/
EOF
buildah umount "$ctr" >/dev/null
buildah config --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
buildah commit --quiet --rm "$ctr" "$rust_standin" >/dev/null
ctr=$(buildah from scratch)
m=$(buildah mount "$ctr")
for lib in $(ldd "$bin_dir/concord" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
  install -D -m 0755 "$(readlink -f "$lib")" "$m$lib"
done
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$m/etc/ssl/certs/ca-certificates.crt"
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
  'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$m/etc/passwd"
printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'tty:x:5:' 'staff:x:50:' 'nonroot:x:65532:' >"$m/etc/group"
install -d -m 1777 "$m/tmp"
install -d -m 0755 "$m/var/lib/dpkg/status.d"
install -d -m 0700 -o 65532 -g 65532 "$m/home/nonroot"
buildah umount "$ctr" >/dev/null
buildah config --user 65532 --workingdir /home/nonroot \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$ctr"
buildah commit --quiet --rm "$ctr" "$base_standin" >/dev/null
ctr=""

for target in concord concord-shop; do
  echo "containerfile-check: buildah bud --target $target"
  buildah bud --quiet --format docker \
    --build-arg RUST_IMAGE="$rust_standin" --build-arg RUNTIME_IMAGE="$base_standin" \
    --build-arg VERSION="$tag" --build-arg REVISION="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)" \
    --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" --build-arg SOURCE="$source_url" \
    --target "$target" -t "localhost/$target:$tag" -f "$root/Containerfile" "$root" >/dev/null
done

echo "containerfile-check: the Containerfile's images against build.sh's ($version)"
differences=0
for name in concord concord-shop; do
  offline="localhost/$name:$version"
  if ! podman image exists "$offline"; then
    echo "containerfile-check: no $offline: run deploy/image/build.sh first" >&2
    exit 2
  fi
  # Configuration: everything but the labels that say when, from what and which version.
  if ! python3 - "$offline" "localhost/$name:$tag" <<'EOF'; then differences=$((differences + 1)); fi
import json, subprocess, sys
def config(image):
    d = json.loads(subprocess.check_output(["podman", "image", "inspect", image]))[0]
    c = dict(d["Config"])
    labels = dict(c.pop("Labels", None) or {})
    for l in ("created", "revision", "version"):
        labels.pop("org.opencontainers.image." + l, None)
    labels.pop("io.buildah.version", None)
    c["Labels"] = labels
    c["Healthcheck"] = d.get("Healthcheck")
    return c
a, b = config(sys.argv[1]), config(sys.argv[2])
diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
for k in diff:
    print(f"  differs: {k}: build.sh {a.get(k)!r}, Containerfile {b.get(k)!r}")
print(f"{'FAIL' if diff else 'ok'}: {sys.argv[1]}: the Containerfile gives the same configuration")
sys.exit(1 if diff else 0)
EOF
  # Files: owner, group and mode of what the contract names.
  ma=$(podman image mount "$offline")
  mb=$(podman image mount "localhost/$name:$tag")
  files=(/var/lib /var/lib/concord /tmp /home/nonroot /usr/local/bin/concord /etc/passwd /etc/group
    /etc/nsswitch.conf /etc/ssl/certs/ca-certificates.crt)
  [ "$name" = concord-shop ] && files+=(/usr/local/bin/concord-shop)
  for f in "${files[@]}"; do
    a=$(stat -c '%u:%g %a' "$ma$f" 2>&1 | sed "s#$ma##")
    b=$(stat -c '%u:%g %a' "$mb$f" 2>&1 | sed "s#$mb##")
    if [ "$a" != "$b" ]; then
      echo "  differs: $f: build.sh $a, Containerfile $b"
      differences=$((differences + 1))
    fi
  done
  for f in /etc/passwd /etc/group /etc/nsswitch.conf /usr/local/bin/concord; do
    cmp -s "$ma$f" "$mb$f" || { echo "  differs: the content of $f"; differences=$((differences + 1)); }
  done
  podman image unmount "$offline" "localhost/$name:$tag" >/dev/null
done
[ "$differences" -eq 0 ] || { echo "containerfile-check: $differences differences" >&2; exit 1; }
echo "ok: the files of both images have the same owners, modes and contents"

echo "containerfile-check: test.sh on the Containerfile's images"
CONCORD_IMAGE_VERSION="$tag" "$here/test.sh" "$bin_dir" | sed 's/^image: \([0-9]* passed\)/containerfile: \1/'
