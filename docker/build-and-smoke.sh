#!/usr/bin/env bash
# Build the spend-guard image without a daemon (buildah) and send guarded calls through it.
#
#   bash docker/build-and-smoke.sh            # as root, on Debian/Ubuntu (installs buildah if missing)
#
# 1. The base image is BASE_IMAGE (default python:3.11-slim). When it cannot be pulled (no
#    registry access), a local Debian bookworm base with python3 is built once with debootstrap
#    from the machine's Debian mirror and kept in buildah's storage for the next run.
# 2. The image is built from docker/Dockerfile (layers cached: a code change reuses the
#    dependency layer) and checked with hadolint when it is installed.
# 3. A container of it runs `spend-guard serve --demo` as the image's user; one call the demo
#    key's limit allows must come back 200 with its cost, and one it does not must be refused 402.
#
# Environment: BASE_IMAGE, IMAGE (default localhost/spend-guard:smoke), BUILDAH_STORAGE_DRIVER (vfs),
# PIP_CERT (a CA bundle the build's pip should trust, default: pip's own `cert` setting).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

IMAGE=${IMAGE:-localhost/spend-guard:smoke}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
LOCAL_BASE=localhost/spend-guard-base:bookworm
export STORAGE_DRIVER=${BUILDAH_STORAGE_DRIVER:-vfs}
export BUILDAH_ISOLATION=chroot
buildah() { command buildah --storage-driver "$STORAGE_DRIVER" "$@"; }
step() { printf '== %s (%ss)\n' "$*" "$(( $(date +%s) - started ))"; }

need=()
# `type -P`: the binaries on PATH (`command -v buildah` finds the wrapper function above).
type -P buildah >/dev/null 2>&1 || need+=(buildah)
type -P debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if ((${#need[@]})); then
  step "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if command -v hadolint >/dev/null 2>&1; then
  step "hadolint docker/Dockerfile"
  hadolint docker/Dockerfile
fi

base=$BASE_IMAGE
if buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1 || timeout 120 buildah pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
  step "base image $BASE_IMAGE"
else
  base=$LOCAL_BASE
  if buildah inspect --type image "$LOCAL_BASE" >/dev/null 2>&1; then
    step "$BASE_IMAGE cannot be pulled; reusing the local base $LOCAL_BASE"
  else
    step "$BASE_IMAGE cannot be pulled; building $LOCAL_BASE with debootstrap"
    # The mirror this machine's apt uses (deb822 or one-line sources).
    mirror=$( { cat /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null || true; } \
             | awk '/^(URIs:|deb )/ && !/security/ {print $2; exit}')
    rootfs=$(mktemp -d /var/tmp/spend-guard-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$rootfs" ${mirror:+"$mirror"} >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    ctr=$(buildah from scratch)
    mnt=$(buildah mount "$ctr")
    cp -a "$rootfs"/. "$mnt"/
    buildah umount "$ctr" >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
    buildah commit -q --rm "$ctr" "$LOCAL_BASE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
  fi
fi

# vfs keeps a full copy of every layer: drop what earlier runs left untagged (their intermediate
# layers) so the storage stays bounded; the base and the last image stay.
buildah rmi --prune >/dev/null 2>&1 || true

step "building $IMAGE on $base"
PIP_CERT=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}
tls=()
if [[ -n ${PIP_CERT:-} && -r $PIP_CERT ]]; then
  # This machine trusts a CA of its own for PyPI (pip's `cert`): the build's pip needs it too.
  tls=(--volume "$PIP_CERT:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
fi
buildah build -q --layers --format docker --isolation chroot --build-arg "BASE_IMAGE=$base" "${tls[@]}" \
  -f docker/Dockerfile -t "$IMAGE" . >/dev/null

step "checking the image: user, build leftovers"
ctr=$(buildah from "$IMAGE")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
user=$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")
[[ $user =~ ^[0-9]+(:[0-9]+)?$ ]] || { echo "image USER is '$user', not numeric" >&2; exit 1; }
leftovers=$(buildah run "$ctr" -- sh -c 'find / -xdev \( -name "*.egg-info" -o -path /src \) 2>/dev/null | head -n5')
[[ -z $leftovers ]] || { echo "build leftovers in the image: $leftovers" >&2; exit 1; }

step "checking the image: every package installed is the release requirements/runtime.txt pins"
buildah run "$ctr" -- pip freeze | python3 -c '
import re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pins = dict((norm(n), v) for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open(sys.argv[1]).read(), re.M))
found = dict((norm(n), v) for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", sys.stdin.read(), re.M))
found.pop("imagerouter-spend-guard", None)
wrong = sorted(f"{n}=={v} (lock: {pins.get(n)})" for n, v in found.items() if pins.get(n) != v)
sys.exit("not as locked: " + ", ".join(wrong) if wrong else None)
' requirements/runtime.txt

step "smoke test: spend-guard serve --demo in the container (port 8181): one allowed call, one refused, the healthcheck"
healthcheck=$(buildah inspect --type image "$IMAGE" \
  | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["Docker"]["config"]["Healthcheck"]["Test"]))')
buildah run --env SPEND_GUARD_PORT=8181 --env "HEALTHCHECK=$healthcheck" "$ctr" -- python3 - <<'PY'
import json, os, subprocess, sys, tempfile, time, urllib.error, urllib.request

port = os.environ["SPEND_GUARD_PORT"]
log = tempfile.TemporaryFile(mode="w+")
proxy = subprocess.Popen(["spend-guard", "serve", "--demo", "--host", "127.0.0.1"], stdout=log, stderr=log, text=True)
base = f"http://127.0.0.1:{port}"


def call(model: str) -> tuple[int, dict]:
    body = json.dumps({"model": model, "prompt": "a lighthouse"}).encode()
    request = urllib.request.Request(f"{base}/v1/openai/images/generations", body, method="POST",
                                     headers={"Authorization": "Bearer sk-demo-bob", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


try:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base}/-/readyz", timeout=2) as response:
                if response.status == 200:
                    break
        except (OSError, urllib.error.HTTPError):
            pass
        if proxy.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            sys.exit(f"the proxy did not become ready:\n{log.read()}")
        time.sleep(0.2)
    status, allowed = call("google/gemini-2.5-flash")
    assert status == 200 and allowed.get("cost") == 0.039, (status, allowed)
    status, refused = call("openai/gpt-image-1")
    assert status == 402 and refused["error"]["type"] == "spend_limit_exceeded", (status, refused)
    print(f"allowed: 200, cost {allowed['cost']}; refused: 402 {refused['error']['message']}")
    # The image's HEALTHCHECK, as a runtime would run it: it must follow SPEND_GUARD_PORT.
    kind, *command = json.loads(os.environ["HEALTHCHECK"])
    assert kind == "CMD", kind
    assert subprocess.run(command, timeout=10).returncode == 0, "healthcheck failed on a healthy proxy"
    elsewhere = {**os.environ, "SPEND_GUARD_PORT": "1"}
    assert subprocess.run(command, env=elsewhere, timeout=10, stderr=subprocess.DEVNULL).returncode != 0
    print(f"healthcheck: healthy on port {port}, unhealthy where nothing listens")
finally:
    proxy.terminate()
    proxy.wait(30)
PY
step "ok: $IMAGE built and guarded a call"
