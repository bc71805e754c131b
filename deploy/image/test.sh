#!/usr/bin/env bash
# Tests the images deploy/image/build.sh built (localhost/concord:VERSION and
# localhost/concord-shop:VERSION) with podman: sizes, configuration and files; then a container
# run as a platform runs it (read-only root, /tmp a tmpfs, a named volume at /var/lib/concord, the
# port published on 127.0.0.1) answers /health and /ready, passes `podman healthcheck run`, takes
# an event over its port with a scoped key and reads it back, runs as uid 65532, drains and exits 0
# on SIGTERM within the grace period, and keeps its data in the volume across a restart. Then
# the shop image's binary runs once. Containers, the volume and (unless CONCORD_IMAGE_KEEP=1) the
# two images are removed afterwards, whatever happened.
#
#   deploy/image/test.sh [BIN_DIR]    # BIN_DIR: the binaries the images were built from, for
#                                     # their sizes (or CONCORD_BIN_DIR; default target/release)
#
# Environment: CONCORD_IMAGE_VERSION (default: the workspace version), CONCORD_IMAGE_KEEP=1 (keep
# the images), CONCORD_IMAGE_TEST_GRACE_S (podman stop -t, default 15), CONCORD_IMAGE_TEST_RUN_ARGS
# (extra `podman run` arguments, e.g. "--user 0:0" to see the uid check fail), CONTAINERS_CONF
# (default deploy/image/containers.conf). Needs podman, runc, curl and python3; run as root.
# Prints one line per check and ends with "image: N passed, N failed"; exits 1 when any failed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
# Podman schedules health checks with systemd timers; with no systemd it logs "unable to get
# systemd connection" at every start and removal. The test runs the image's check itself
# (`podman healthcheck run`), so the timers are turned off.
export DISABLE_HC_SYSTEMD=true

bin_dir="${1:-${CONCORD_BIN_DIR:-$root/target/release}}"
workspace_version=$(awk '/^\[workspace\.package\]/{s=1;next} /^\[/{s=0} s&&$1=="version"{gsub(/"/,"",$3);print $3;exit}' "$root/Cargo.toml")
version="${CONCORD_IMAGE_VERSION:-$workspace_version}"
license=$(awk '/^\[workspace\.package\]/{s=1;next} /^\[/{s=0} s&&$1=="license"{gsub(/"/,"",$3);print $3;exit}' "$root/Cargo.toml")
image="localhost/concord:$version"
shop_image="localhost/concord-shop:$version"
grace_s="${CONCORD_IMAGE_TEST_GRACE_S:-15}"
drain_ms=2000
max_binary_bytes=$((40 * 1000 * 1000))
max_image_bytes=$((60 * 1000 * 1000))
uid=65532
# shellcheck disable=SC2206
extra_run_args=(${CONCORD_IMAGE_TEST_RUN_ARGS:-})

for tool in podman curl python3; do
  command -v "$tool" >/dev/null || { echo "test.sh: $tool is not installed" >&2; exit 2; }
done

passed=0
failed=0
ok() { echo "ok: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
# check DESCRIPTION COMMAND...: one check, passed when the command succeeds.
check() {
  local what=$1
  shift
  if "$@"; then ok "$what"; else fail "$what"; fi
}
# expect DESCRIPTION ACTUAL WANTED
expect() {
  if [ "$2" == "$3" ]; then ok "$1 ($2)"; else fail "$1: got '$2', want '$3'"; fi
}
mb() { awk -v b="$1" 'BEGIN{printf "%.1f MB", b/1000000}'; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }

run_id="concord-image-test-$$"
ctr="$run_id"
vol="$run_id-data"
mounted=()
cleanup() {
  local rc=$?
  if [ "$failed" -gt 0 ] && podman container exists "$ctr" 2>/dev/null; then
    echo "--- last lines of the server's log ---"
    podman logs --tail 40 "$ctr" 2>&1 | sed 's/^/  /'
  fi
  for m in "${mounted[@]}"; do podman image unmount "$m" >/dev/null 2>&1 || true; done
  podman rm -f -t 0 "$ctr" "$run_id-shop" >/dev/null 2>&1 || true
  podman volume rm -f "$vol" >/dev/null 2>&1 || true
  if [ "${CONCORD_IMAGE_KEEP:-}" != 1 ]; then
    podman rmi -f "$shop_image" "$image" >/dev/null 2>&1 || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for i in "$image" "$shop_image"; do
  podman image exists "$i" || { echo "test.sh: no image $i: run deploy/image/build.sh first" >&2; exit 2; }
done

echo "== sizes"
for b in concord concord-shop; do
  f="$bin_dir/$b"
  if [ ! -f "$f" ]; then fail "$f exists"; continue; fi
  bytes=$(stat -c %s "$f")
  echo "   $b binary: $bytes bytes ($(mb "$bytes"))"
  if command -v readelf >/dev/null; then
    check "$b carries no debug info (no .debug_info section)" bash -c "! readelf -S '$f' | grep -q '\.debug_info'"
  else
    check "$b carries no debug info (file)" bash -c "! file '$f' | grep -q 'with debug_info'"
  fi
done
bytes=$(stat -c %s "$bin_dir/concord" 2>/dev/null || echo 0)
check "concord binary under $(mb $max_binary_bytes)" test "$bytes" -gt 0 -a "$bytes" -lt "$max_binary_bytes"
image_bytes=$(podman image inspect --format '{{.Size}}' "$image")
shop_bytes=$(podman image inspect --format '{{.Size}}' "$shop_image")
echo "   $image: $image_bytes bytes ($(mb "$image_bytes"))"
echo "   $shop_image: $shop_bytes bytes ($(mb "$shop_bytes"), the server image's layer shared)"
check "$image under $(mb $max_image_bytes)" test "$image_bytes" -lt "$max_image_bytes"

echo "== configuration"
healthcheck='["CMD","/usr/local/bin/concord","healthcheck","--url","http://127.0.0.1:7400"]'
for i in "$image" "$shop_image"; do
  cfg=$(podman image inspect "$i")
  field() { json "$1" <<<"$cfg"; }
  expect "$i: user" "$(field 'd[0]["Config"].get("User")')" "$uid:$uid"
  expect "$i: workdir" "$(field 'd[0]["Config"].get("WorkingDir")')" /var/lib/concord
  expect "$i: exposed port" "$(field '",".join(d[0]["Config"].get("ExposedPorts") or {})')" 7400/tcp
  expect "$i: volume" "$(field '",".join(d[0]["Config"].get("Volumes") or {})')" /var/lib/concord
  expect "$i: stop signal" "$(field 'd[0]["Config"].get("StopSignal")')" SIGTERM
  expect "$i: CONCORD_LISTEN" "$(field '[e for e in d[0]["Config"]["Env"] if e.startswith("CONCORD_LISTEN=")]')" "['CONCORD_LISTEN=0.0.0.0:7400']"
  expect "$i: CONCORD_DATABASE_URL" "$(field '[e for e in d[0]["Config"]["Env"] if e.startswith("CONCORD_DATABASE_URL=")]')" \
    "['CONCORD_DATABASE_URL=sqlite:///var/lib/concord/concord.db']"
  expect "$i: exec-form health check" "$(field 'json.dumps(d[0]["Healthcheck"]["Test"], separators=(",",":"))')" "$healthcheck"
  for l in title description version source licenses revision created; do
    check "$i: label org.opencontainers.image.$l is set" test -n "$(field "(d[0][\"Config\"].get(\"Labels\") or {}).get(\"org.opencontainers.image.$l\", \"\")")"
  done
  expect "$i: version label" "$(field 'd[0]["Config"]["Labels"]["org.opencontainers.image.version"]')" "$version"
  expect "$i: licenses label" "$(field 'd[0]["Config"]["Labels"]["org.opencontainers.image.licenses"]')" "$license"
done
expect "$image: entrypoint and cmd" "$(podman image inspect "$image" | json 'd[0]["Config"]["Entrypoint"] + d[0]["Config"]["Cmd"]')" \
  "['/usr/local/bin/concord', 'serve']"
expect "$shop_image: entrypoint and cmd" "$(podman image inspect "$shop_image" | json 'd[0]["Config"]["Entrypoint"] + d[0]["Config"]["Cmd"]')" \
  "['/usr/local/bin/concord-shop', 'demo']"

echo "== files"
for i in "$image" "$shop_image"; do
  m=$(podman image mount "$i") || { fail "$i: podman image mount"; continue; }
  mounted+=("$i")
  expect "$i: /var/lib/concord owner and mode" "$(stat -c '%u:%g %a' "$m/var/lib/concord")" "$uid:$uid 700"
  expect "$i: /tmp mode" "$(stat -c '%a' "$m/tmp")" 1777
  check "$i: CA certificates at /etc/ssl/certs/ca-certificates.crt" test -s "$m/etc/ssl/certs/ca-certificates.crt"
  check "$i: nonroot (65532) in /etc/passwd" grep -qx "nonroot:x:$uid:$uid:nonroot:/home/nonroot:/sbin/nologin" "$m/etc/passwd"
  check "$i: nonroot (65532) in /etc/group" grep -qx "nonroot:x:$uid:" "$m/etc/group"
  check "$i: no shell in the image" test ! -e "$m/bin/sh" -a ! -e "$m/usr/bin/sh"
  check "$i: /usr/local/bin/concord" test -x "$m/usr/local/bin/concord"
  if [ "$i" = "$shop_image" ]; then
    check "$i: /usr/local/bin/concord-shop" test -x "$m/usr/local/bin/concord-shop"
  fi
done
for i in "${mounted[@]}"; do podman image unmount "$i" >/dev/null 2>&1 || true; done
mounted=()

echo "== a running server"
admin_key="image-test-admin-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export CONCORD_ADMIN_KEY="$admin_key" # passed by name: never on a command line
podman volume create "$vol" >/dev/null
start_server() {
  podman run -d --name "$ctr" --runtime runc --read-only --tmpfs /tmp \
    -v "$vol:/var/lib/concord" -p 127.0.0.1::7400 \
    --env CONCORD_ADMIN_KEY --env "CONCORD_DRAIN_MS=$drain_ms" \
    "${extra_run_args[@]}" "$image" >/dev/null
}
wait_for() { # URL: up to 30 s for a 200
  for _ in $(seq 1 60); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1")" = 200 ] && return 0
    sleep 0.5
  done
  return 1
}
if ! start_server; then
  fail "podman run $image"
  echo "image: $passed passed, $failed failed"
  exit 1
fi
ok "podman run --read-only --tmpfs /tmp -v $vol:/var/lib/concord -p 127.0.0.1::7400 $image"
port=$(podman port "$ctr" 7400/tcp | head -n1 | sed 's/.*://')
url="http://127.0.0.1:$port"
echo "   published on $url"
check "GET /health answers 200" wait_for "$url/health"
check "GET /ready answers 200" wait_for "$url/ready"
check "podman healthcheck run passes" podman healthcheck run "$ctr"
expect "health status" "$(podman inspect --format '{{.State.Health.Status}}' "$ctr")" healthy
expect "read-only root filesystem" "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$ctr")" true

pid=$(podman inspect --format '{{.State.Pid}}' "$ctr")
expect "the process's uids (real, effective, saved, fs) from the host" \
  "$(awk '/^Uid:/{print $2, $3, $4, $5}' "/proc/$pid/status")" "$uid $uid $uid $uid"
expect "the process's gids from the host" "$(awk '/^Gid:/{print $2, $3, $4, $5}' "/proc/$pid/status")" "$uid $uid $uid $uid"
expect "podman inspect: user" "$(podman inspect --format '{{.Config.User}}' "$ctr")" "$uid:$uid"

created=$(CONCORD_KEY="$admin_key" podman exec --env CONCORD_KEY "$ctr" \
  concord keys create --name image-test --scope events:write --scope events:read)
key=$(json 'd["key"]' <<<"$created" 2>/dev/null)
check "concord keys create (in the container, with the admin key from CONCORD_ADMIN_KEY)" test -n "$key"
stream="imagetest-$$"
marker="run-$$-$RANDOM"
status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -X POST "$url/v1/streams/$stream" \
  -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
  -d "{\"expected_version\":\"no_stream\",\"events\":[{\"type\":\"ImageTested\",\"data\":{\"marker\":\"$marker\"}}]}")
expect "append an event over the published port" "$status" 200
read_back() {
  curl -s --max-time 10 "$url/v1/streams/$stream" -H "Authorization: Bearer $key" | json 'd["events"][0]["data"]["marker"]' 2>/dev/null
}
expect "read it back" "$(read_back)" "$marker"
status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -X POST "$url/v1/keys" \
  -H "Authorization: Bearer $key" -H 'Content-Type: application/json' -d '{"name":"x","scopes":["admin"]}')
expect "the scoped key may not create keys" "$status" 403
dir=$(podman volume inspect --format '{{.Mountpoint}}' "$vol")
expect "the database in the volume, owned by 65532" "$(stat -c '%u:%g' "$dir/concord.db" 2>&1)" "$uid:$uid"
expect "the vault's key file in the volume, mode 600" "$(stat -c '%u %a' "$dir/concord-vault.key" 2>&1)" "$uid 600"

echo "== SIGTERM"
t0=$EPOCHREALTIME
podman stop -t "$grace_s" "$ctr" >/dev/null 2>&1 &
stopper=$!
draining=""
for _ in $(seq 1 20); do
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url/ready")
  if [ "$code" = 503 ]; then draining=503; break; fi
  sleep 0.05
done
wait "$stopper"
stop_rc=$?
t1=$EPOCHREALTIME
elapsed_ms=$(( (${t1/./} - ${t0/./}) / 1000 ))
echo "   podman stop -t $grace_s: exited after $elapsed_ms ms (drain_ms $drain_ms)"
expect "podman stop" "$stop_rc" 0
expect "GET /ready answers 503 while draining" "$draining" 503
expect "exit code after SIGTERM" "$(podman inspect --format '{{.State.ExitCode}}' "$ctr")" 0
check "exited within the grace period ($elapsed_ms ms < ${grace_s} s)" test "$elapsed_ms" -lt $((grace_s * 1000))
check "served through the drain ($elapsed_ms ms >= $drain_ms ms)" test "$elapsed_ms" -ge "$drain_ms"

echo "== restart on the same volume"
if podman start "$ctr" >/dev/null; then
  port=$(podman port "$ctr" 7400/tcp | head -n1 | sed 's/.*://')
  url="http://127.0.0.1:$port"
  check "GET /ready answers 200 after the restart" wait_for "$url/ready"
  expect "the event is still there" "$(read_back)" "$marker"
else
  fail "podman start after the stop"
fi
podman stop -t "$grace_s" "$ctr" >/dev/null 2>&1

echo "== the shop image"
help=$(podman run --rm --name "$run_id-shop" --runtime runc --read-only --tmpfs /tmp --no-healthcheck "$shop_image" --help)
expect "concord-shop --help exits 0" "$?" 0
check "concord-shop --help lists demo" grep -q demo <<<"$help"
expect "concord in the shop image" \
  "$(podman run --rm --runtime runc --read-only --no-healthcheck --entrypoint /usr/local/bin/concord "$shop_image" --version)" "concord $workspace_version"

echo "image: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
