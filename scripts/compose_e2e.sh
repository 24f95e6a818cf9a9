#!/usr/bin/env bash
# compose_e2e.sh: build the image and run the compose stack for real, measuring each step.
#
#   bash scripts/compose_e2e.sh            # exit 0: passed, 1: a check failed, 77: no Docker engine (skipped)
#
# Builds the image from this working tree, starts Redis + 2 workers + Flower (+ the gateway) serving a local model
# given by environment variables only (no override file), runs jobs (the README's
# `docker-compose run --rm --no-deps worker pocket-tts enqueue ... --wait` among them), stops a worker
# mid-job with `docker stop --time 90` and shows the job redone by the other, kills one mid-job
# (SIGKILL: redone after the visibility timeout), checks Flower's auth and the thread budget through
# Flower's Grow button, checks that no secret shows in `docker inspect`, scales up and down,
# restarts a misconfigured worker a bounded number of times, and tears everything down.
#
# Where registries are unreachable, base images and wheels come from ../shared/docker-lab
# (make_base_images.sh, wheelhouse.sh); elsewhere the Dockerfile's defaults apply.
#
# Environment: DOCKER_LAB (default ../shared/docker-lab), E2E_MODEL_DIR (a checkpoint folder with
# config.yaml, model.safetensors, tokenizer.model; default ../shared/parity), E2E_VOICE (a wav;
# default voice_24k.wav from it), E2E_PROJECT (default pocket-tts-e2e), E2E_NO_CACHE=1 (build
# without the layer cache), E2E_KEEP=1 (leave the stack up), E2E_BUILD_ARGS (docker build args;
# default: the lab's wheelhouse when the lab is there).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

LAB=${DOCKER_LAB:-$REPO/../shared/docker-lab}
MODEL_SRC=${E2E_MODEL_DIR:-$REPO/../shared/parity}
VOICE_SRC=${E2E_VOICE:-$MODEL_SRC/voice_24k.wav}
PROJECT=${E2E_PROJECT:-pocket-tts-e2e}
IMAGE=pocket-tts-worker:e2e
LAB_WORK=${WORK:-${TMPDIR:-/tmp}/docker-lab}
E2E=$(mktemp -d "${TMPDIR:-/tmp}/compose-e2e.XXXXXX")
RESULTS=$E2E/results.txt
STARTED=$(date +%s.%N)
# Short limits, so that a killed job comes back within a minute: the visibility timeout must exceed the
# longest hard limit (10 + 0.05 x 1100 + 5 = 70 s).
SOFT_SHUTDOWN=3
VISIBILITY=75
SENTENCES="This long text keeps one worker busy for several seconds, long enough to stop it in the middle of the job. It goes on, sentence after sentence, so that the job is still running when its worker is asked to leave, and another worker has to take it over and finish it."
# Four times over (~1060 characters): one copy took 0.8 s on a quiet CI machine, too short to stop mid-job;
# four take ~3 s there and 10-30 s on a loaded 2-core machine, well inside the 70 s hard limit.
LONG_TEXT="$SENTENCES $SENTENCES $SENTENCES $SENTENCES"

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "${2:-$(now)}"; }
log() { printf '[compose_e2e %6ss] %s\n' "$(since "$STARTED")" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
skip() { log "SKIPPED: $*"; exit 77; }
record() { printf '%-58s %s\n' "$1" "$2" >>"$RESULTS"; log "measured: $1 = $2"; }
compose() { docker-compose -p "$PROJECT" -f "$REPO/docker-compose.yml" "$@"; }
client() {  # the e2e client inside the stack's network, as the app user of the image
    compose run --rm --no-deps -T -v "$E2E/compose_e2e_client.py:/tmp/compose_e2e_client.py:ro" worker \
        python /tmp/compose_e2e_client.py "$@"
}
worker_containers() {  # the scaled workers, not one-off `run` containers of the same service
    docker ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=worker" \
        --filter "label=com.docker.compose.oneoff=False" "$@"
}

# ---- a Docker engine -----------------------------------------------------------------------------
command -v docker >/dev/null || skip "the docker CLI is not installed (Debian: apt-get install docker.io docker-compose)"
command -v docker-compose >/dev/null || skip "docker-compose is not installed (Debian: apt-get install docker-compose)"
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null && [ "$(id -u)" -eq 0 ] || skip "no Docker engine answers and this user cannot start dockerd"
    mkdir -p "$LAB_WORK"
    log "starting dockerd (log: $LAB_WORK/dockerd.log)"
    setsid dockerd >"$LAB_WORK/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || skip "dockerd did not start within 60 s (see $LAB_WORK/dockerd.log; containers may be forbidden here)"
fi

cleanup() {
    local status=$?
    if [ "${E2E_KEEP:-0}" = 1 ]; then
        log "E2E_KEEP=1: the stack stays up (docker-compose -p $PROJECT down -v to remove it); files in $E2E"
    else
        compose down -v --remove-orphans >/dev/null 2>&1 || true
        rm -rf "$E2E"
    fi
    exit "$status"
}
trap cleanup EXIT

# ---- base images and pip sources -----------------------------------------------------------------
missing_images() { for image in python:3.11-slim redis:7-alpine; do docker image inspect "$image" >/dev/null 2>&1 || echo "$image"; done; }
for image in $(missing_images); do timeout 60 docker pull -q "$image" >/dev/null 2>&1 || true; done
if [ -n "$(missing_images)" ]; then
    [ -f "$LAB/make_base_images.sh" ] || skip "cannot pull $(missing_images | xargs) and no docker lab at $LAB"
    log "no registry: building stand-in base images with $LAB/make_base_images.sh"
    WORK=$LAB_WORK bash "$LAB/make_base_images.sh" >"$E2E/base-images.log" 2>&1 || { tail -20 "$E2E/base-images.log"; fail "make_base_images.sh"; }
fi
if [ -n "${E2E_BUILD_ARGS+set}" ]; then
    read -r -a BUILD_ARGS <<<"$E2E_BUILD_ARGS"
elif [ -f "$LAB/wheelhouse.sh" ]; then
    log "filling and serving the lab's wheelhouse (pip download on the host)"
    WORK=$LAB_WORK bash "$LAB/wheelhouse.sh" fill "$REPO[flower,gateway]" >"$E2E/wheelhouse.log" 2>&1 || { tail -20 "$E2E/wheelhouse.log"; fail "wheelhouse.sh fill"; }
    WORK=$LAB_WORK bash "$LAB/wheelhouse.sh" serve >>"$E2E/wheelhouse.log" 2>&1 || { tail -20 "$E2E/wheelhouse.log"; fail "wheelhouse.sh serve"; }
    BUILD_ARGS=(--network host --build-arg PIP_NO_INDEX=1 --build-arg "PIP_FIND_LINKS=http://127.0.0.1:${PORT:-8780}/")
else
    BUILD_ARGS=()
fi

# ---- the image: a full build, then a code-only change ---------------------------------------------
# The build context is a copy of the working tree (tracked and untracked, not ignored files), so the
# code-only change below never touches the checkout.
mkdir "$E2E/context"
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$E2E/context/" 2>/dev/null || true
cp "$REPO/scripts/compose_e2e_client.py" "$E2E/"
no_cache=()
[ "${E2E_NO_CACHE:-0}" = 1 ] && no_cache=(--no-cache)
log "building $IMAGE ${BUILD_ARGS[*]} ${no_cache[*]}"
t0=$(now)
docker build "${BUILD_ARGS[@]}" "${no_cache[@]}" -t "$IMAGE" "$E2E/context" >"$E2E/build.log" 2>&1 || { tail -30 "$E2E/build.log"; fail "docker build"; }
record "image build (${no_cache[*]:-layer cache allowed}), s" "$(since "$t0")"
record "image size, MB" "$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f", $1 / 1e6}')"
printf '\n# code-only change %s\n' "$(date +%s)" >>"$E2E/context/tasks/__init__.py"
t0=$(now)
docker build "${BUILD_ARGS[@]}" -t "$IMAGE" "$E2E/context" >"$E2E/rebuild.log" 2>&1 || { tail -30 "$E2E/rebuild.log"; fail "docker build (code-only change)"; }
record "rebuild after a code-only change, s" "$(since "$t0")"
grep -A2 "requirements.py torch" "$E2E/rebuild.log" | grep -q "Using cache" || fail "the dependency layer was rebuilt for a code-only change"
docker run --rm --entrypoint sh "$IMAGE" -c \
    'test ! -e /app/tests && test ! -e /app/scripts && ! python -c "import tasks.local_stack" 2>/dev/null && pocket-tts --version' \
    >"$E2E/image-check.log" 2>&1 || { cat "$E2E/image-check.log"; fail "the image holds test or benchmark helpers, or pocket-tts does not run"; }

# ---- a local model, voices and secrets, all given by environment variables ------------------------
mkdir -p "$E2E/models" "$E2E/voices" "$E2E/secrets"
cp "$MODEL_SRC/model.safetensors" "$MODEL_SRC/tokenizer.model" "$E2E/models/"
# The small random-weight checkpoint never ends a sentence by itself: its jobs run as long as their text allows.
{ grep -v '^default_eos_threshold:' "$MODEL_SRC/config.yaml"; echo "default_eos_threshold: 1.0e9"; } >"$E2E/models/config.yaml"
cp "$VOICE_SRC" "$E2E/voices/voice.wav"
python3 -c "import secrets; print(secrets.token_hex(16))" >"$E2E/secrets/redis_password"
FLOWER_PASSWORD=$(python3 -c "import secrets; print(secrets.token_hex(12))")
echo "admin:$FLOWER_PASSWORD" >"$E2E/secrets/flower_basic_auth"
GATEWAY_KEY=$(python3 -c "import secrets; print(secrets.token_hex(16))")
echo "$GATEWAY_KEY" >"$E2E/secrets/gateway_api_keys"
chmod 644 "$E2E"/secrets/* "$E2E"/models/* "$E2E"/voices/*
chmod 755 "$E2E" "$E2E"/models "$E2E"/voices "$E2E"/secrets
REDIS_PASSWORD=$(cat "$E2E/secrets/redis_password")
free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
FLOWER_PORT=$(free_port)
GATEWAY_PORT=$(free_port)
export POCKET_TTS_IMAGE=$IMAGE POCKET_TTS_SECRETS_DIR=$E2E/secrets FLOWER_PORT GATEWAY_PORT \
    POCKET_TTS_NETWORK=$PROJECT POCKET_TTS_AUDIO_VOLUME=$PROJECT-audio \
    POCKET_TTS_MODELS_HOST_DIR=$E2E/models POCKET_TTS_CONFIG=/models/config.yaml \
    POCKET_TTS_WEIGHTS=/models/model.safetensors POCKET_TTS_VOICES_HOST_DIR=$E2E/voices \
    POCKET_TTS_DEFAULT_VOICE=voice.wav HF_HUB_OFFLINE=1 WORKER_CPUS=1 WORKER_HEALTHCHECK_INTERVAL=2s \
    POCKET_TTS_SOFT_SHUTDOWN_TIMEOUT=$SOFT_SHUTDOWN POCKET_TTS_VISIBILITY_TIMEOUT=$VISIBILITY \
    POCKET_TTS_TIME_LIMIT_BASE=10 POCKET_TTS_TIME_LIMIT_PER_CHAR=0.05 POCKET_TTS_TIME_LIMIT_GRACE=5 \
    POCKET_TTS_MAX_TEXT_CHARS=1100

wait_healthy() {  # wait_healthy COUNT TIMEOUT: COUNT running worker containers, all healthy
    local deadline=$(( $(date +%s) + $2 )) healthy
    while [ "$(date +%s)" -lt "$deadline" ]; do
        healthy=0
        for c in $(worker_containers); do
            [ "$(docker inspect -f '{{.State.Health.Status}}' "$c")" = healthy ] && healthy=$((healthy + 1))
        done
        [ "$healthy" -eq "$1" ] && [ "$(worker_containers | wc -l)" -eq "$1" ] && return 0
        sleep 0.5
    done
    compose logs --tail 20 worker >&2
    fail "$1 healthy workers expected within $2 s, $healthy found"
}
container_of() {  # the worker container whose hostname is the Celery node's host
    for c in $(worker_containers); do
        [ "celery@$(docker inspect -f '{{.Config.Hostname}}' "$c")" = "$1" ] && echo "$c" && return 0
    done
    return 1
}

has_gateway() { compose config --services | grep -qx gateway; }

# ---- up: redis + 2 workers + Flower (+ the gateway) -----------------------------------------------
log "docker-compose up -d --scale worker=2 (local model, HF_HUB_OFFLINE=1)"
t0=$(now)
compose up -d --no-build --scale worker=2 >"$E2E/up.log" 2>&1 || { cat "$E2E/up.log"; fail "docker-compose up"; }
record "docker-compose up -d returns, s" "$(since "$t0")"
wait_healthy 2 180
record "up to 2 healthy workers (healthcheck every 2 s), s" "$(since "$t0")"

# The README's command: the stored path, from a one-off container on the stack's network.
t0=$(now)
path=$(compose run --rm --no-deps -T worker pocket-tts enqueue "Hello from the compose stack." --wait --quiet | tr -d '\r')
record "docker-compose run ... pocket-tts enqueue --wait, s" "$(since "$t0")"
case "$path" in /data/audio/*.wav) ;; *) fail "enqueue --wait printed '$path', not a stored path" ;; esac
compose exec -T --index=1 worker test -s "$path" || fail "$path is not in the audio volume"

t0=$(now)
client batch 8 >"$E2E/batch.txt" || fail "a batch of 8 jobs"
record "8 short jobs through 2 workers (client container included), s" "$(since "$t0")"
[ "$(grep -c '^/data/audio/' "$E2E/batch.txt")" -eq 8 ] || fail "8 paths expected: $(cat "$E2E/batch.txt")"

if has_gateway; then
    python3 - "$GATEWAY_PORT" "$GATEWAY_KEY" >"$E2E/gateway.txt" <<'EOF' || { cat "$E2E/gateway.txt"; compose logs --tail 20 gateway >&2; fail "gateway checks"; }
import json, sys, time, urllib.error, urllib.request
port, key = sys.argv[1], sys.argv[2]
def speech(headers):
    body = json.dumps({"model": "pocket-tts", "input": "Hello through the gateway.", "voice": "voice.wav",
                       "response_format": "wav"}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/audio/speech", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError as error:  # not listening yet
        return None, str(error).encode()
deadline = time.monotonic() + 180
while (answer := speech({"Authorization": f"Bearer {key}"}))[0] in (None, 502, 503) and time.monotonic() < deadline:
    time.sleep(1)
assert answer[0] == 200 and answer[1][:4] == b"RIFF", answer[:1] + (answer[1][:200],)
assert speech({})[0] == 401, "the gateway answered without a key"
print(f"gateway: /v1/audio/speech {len(answer[1])} bytes of wav; 401 without a key")
EOF
    log "$(cat "$E2E/gateway.txt")"
fi

# ---- a worker stopped mid-job, then one killed mid-job ---------------------------------------------
interrupt_mid_job() {  # interrupt_mid_job "docker stop --time 90" | "docker kill": the job must be redone elsewhere
    local action=$1 job first second container t_stop t_redo
    # One container sends and watches: a second `docker-compose run` would start seconds into the job.
    local watch_file=$E2E/watch-$(date +%s%N).txt
    : >"$watch_file"  # exists before the first read: the watcher below creates it only when it starts (set -e)
    client send-watch "$LONG_TEXT" $((VISIBILITY + 120)) >"$watch_file" 2>&1 </dev/null &
    local watcher=$!
    for _ in $(seq 600); do
        first=$(awk '$2 == "STARTED" {print $3; exit}' "$watch_file")
        [ -n "$first" ] && break
        sleep 0.1
    done
    job=$(awk '$1 == "job" {print $2; exit}' "$watch_file")
    [ -n "$first" ] || fail "job $job did not start"
    container=$(container_of "$first") || fail "no container for $first"
    sleep 0.3  # inside the job (seconds long), past its first frames
    if grep -q ' SUCCESS ' "$watch_file"; then
        cat "$watch_file"
        fail "job $job finished before '$action' (this machine is faster than LONG_TEXT allows for)"
    fi
    t_stop=$(now)
    $action "$container" >/dev/null
    record "'$action' of a worker mid-job returned after, s" "$(since "$t_stop")"
    wait "$watcher" || { cat "$watch_file"; fail "job $job was not redone after '$action'"; }
    second=$(awk -v first="$first" '$2 == "STARTED" && $3 != first {print $3; exit}' "$watch_file")
    [ -n "$second" ] || { cat "$watch_file"; fail "job $job did not start on another worker"; }
    t_redo=$(awk -v second="$second" '$2 == "STARTED" && $3 == second {print $1; exit}' "$watch_file")
    record "job redone on the other worker after '$action', s" "$(since "$t_stop" "$t_redo")"
    record "job finished after '$action', s" "$(since "$t_stop" "$(awk '$2 == "SUCCESS" {print $1}' "$watch_file")")"
}
interrupt_mid_job "docker stop --time 90"
compose up -d --no-build --scale worker=2 >/dev/null 2>&1
wait_healthy 2 180
interrupt_mid_job "docker kill"
compose up -d --no-build --scale worker=2 >/dev/null 2>&1
wait_healthy 2 180

# ---- Flower: auth, the thread budget behind its Grow button, its open endpoints --------------------
python3 - "$FLOWER_PORT" "$FLOWER_PASSWORD" >"$E2E/flower.txt" <<'EOF' || { cat "$E2E/flower.txt"; fail "Flower checks"; }
import base64, json, sys, time, urllib.error, urllib.request
port, password = sys.argv[1], sys.argv[2]
auth = {"Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}
def call(path, method="GET", headers=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
assert call("/")[0] == 401, "Flower answered without auth"
for _ in range(60):
    status, body = call("/api/workers?refresh=1", headers=auth)
    if status == 200 and len(json.loads(body)) >= 2:
        break
    time.sleep(1)
workers = sorted(json.loads(body))
assert len(workers) >= 2, body
status, body = call(f"/api/worker/pool/grow/{workers[0]}?n=4", method="POST", headers=auth)
assert status == 403 and "refusing a pool of" in body, (status, body)
print(f"grow refused: {body}")
for path in ("/metrics", "/healthcheck"):
    print(f"{path} without auth: HTTP {call(path)[0]}")
EOF
log "$(cat "$E2E/flower.txt" | tr '\n' ' ')"

# ---- secrets stay out of docker inspect; Redis never evicts ---------------------------------------
for c in $(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"); do
    if docker inspect "$c" | grep -q -e "$REDIS_PASSWORD" -e "$FLOWER_PASSWORD" -e "$GATEWAY_KEY"; then
        fail "a secret shows in docker inspect $c"
    fi
done
policy=$(compose exec -T redis sh -c 'REDISCLI_AUTH=$(cat /run/secrets/redis_password) redis-cli config get maxmemory-policy' | tail -1 | tr -d '\r')
[ "$policy" = noeviction ] || fail "Redis maxmemory-policy is '$policy'"

# ---- scale up and down -----------------------------------------------------------------------------
t0=$(now)
compose up -d --no-build --no-recreate --scale worker=3 >/dev/null 2>&1
wait_healthy 3 180
record "scale 2 -> 3 workers, until healthy, s" "$(since "$t0")"
t0=$(now)
compose up -d --no-build --no-recreate --scale worker=1 >/dev/null 2>&1
[ "$(worker_containers | wc -l)" -eq 1 ] || fail "scale down to 1 left $(worker_containers | wc -l) workers"
record "scale 3 -> 1 workers, s" "$(since "$t0")"

# ---- a configuration error is not retried forever -------------------------------------------------
t0=$(now)
POCKET_TTS_CONCURRENCY=8 compose up -d --no-build --no-deps --scale worker=1 worker >/dev/null 2>&1
c=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=worker" | head -1)
for _ in $(seq 120); do
    [ "$(docker inspect -f '{{.State.Status}} {{.RestartCount}}' "$c")" = "exited 3" ] && break
    sleep 1
done
sleep 5  # and it stays down
state=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}' "$c")
[ "$state" = "exited 78 3" ] || fail "an oversubscribed worker should end exited (78) after 3 restarts, got: $state"
record "oversubscribed worker: exit 78, restarts, then down after, s" "3, $(since "$t0")"
docker logs "$c" 2>&1 | grep -m1 "refusing to start" >&2 || true

# ---- down ------------------------------------------------------------------------------------------
t0=$(now)
compose down -v --remove-orphans >/dev/null 2>&1
record "docker-compose down -v, s" "$(since "$t0")"
[ -z "$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")" ] || fail "containers left after down"
! docker volume inspect "$PROJECT-audio" >/dev/null 2>&1 || fail "the audio volume is left after down -v"

log "PASSED in $(since "$STARTED") s"
cat "$RESULTS"
