#!/usr/bin/env bash
# Bring up the polyhead services of deploy/docker-compose.yml (trainer, server, updater, simulators) under
# podman-compose, on the local images deploy/podman/build-images.sh built, and show that they serve.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
COMPOSE_FILE="$REPO/deploy/docker-compose.yml"

usage() {
    cat <<EOF
usage: deploy/podman/compose-up.sh [options]

Start the polyhead services of deploy/docker-compose.yml with podman-compose, in the order docker
compose's depends_on conditions give (podman-compose 1.0 ignores the conditions and starts everything at
once):

  1. trainer              runs to completion (trains into the bundles volume unless a bundle is there)
  2. server               until its health check (deploy/docker/healthcheck.py, run with podman exec:
                          podman's periodic health checks need systemd) says SERVING
  3. updater, simulator, simulator-new-task
  4. watch the server's /metrics on localhost:9100 until the simulators' Act calls are counted and
     the updater has published a head for the new task (or --timeout passes: exit 1)

Prometheus and Grafana are not started: their images come from a registry (docker.io), which is not
reachable on machines without one; where it is, 'podman-compose -p polyhead -f deploy/docker-compose.yml
up -d prometheus grafana' adds them.

options:
  --train-steps N   POLYHEAD_TRAIN_STEPS for the trainer (default: \$POLYHEAD_TRAIN_STEPS, else 20000: a
                    quick, barely trained bundle; the compose default is 400000)
  --timeout S       seconds to wait for each step (default: 900)
  --down            stop and remove the stack and its volumes, then exit
  --json            print a JSON summary as the last stdout line
  -h, --help        this help

environment: CONTAINERS_CONF (default deploy/podman/containers.conf), POLYHEAD_ADMIN_TOKEN (default: a
random one for this stack) and the other variables of deploy/docker-compose.yml.
EOF
}

log() { printf '[compose-up] %s\n' "$*" >&2; }
die() { printf '[compose-up] error: %s\n' "$*" >&2; exit "${2:-2}"; }

TRAIN_STEPS="${POLYHEAD_TRAIN_STEPS:-20000}"
TIMEOUT=900
DOWN=0
JSON=0
while (($#)); do
    case "$1" in
        --train-steps) TRAIN_STEPS="${2:?--train-steps needs a value}"; shift 2 ;;
        --timeout) TIMEOUT="${2:?--timeout needs a value}"; shift 2 ;;
        --down) DOWN=1; shift ;;
        --json) JSON=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done

export CONTAINERS_CONF="${CONTAINERS_CONF:-$HERE/containers.conf}"
export POLYHEAD_TRAIN_STEPS="$TRAIN_STEPS"
export POLYHEAD_ADMIN_TOKEN="${POLYHEAD_ADMIN_TOKEN:-$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')}"
PROJECT=polyhead  # the compose file's `name:`, which podman-compose 1.0 does not read
compose() { podman-compose --project-name "$PROJECT" --file "$COMPOSE_FILE" "$@" >/dev/null 2>&1; }
command -v podman-compose >/dev/null || die "podman-compose is not installed (Debian: apt-get install podman-compose)"

if ((DOWN)); then
    log "removing the stack and its volumes"
    podman-compose --project-name "$PROJECT" --file "$COMPOSE_FILE" down --volumes >&2
    exit 0
fi

for image in polyhead-server:0.1.0 polyhead-trainer:0.1.0; do
    podman image exists "$image" || die "image $image is missing: run deploy/podman/build-images.sh first"
done

t_start=$(date +%s)
elapsed() { echo $(($(date +%s) - t_start)); }

# --- 1. trainer ---------------------------------------------------------------------------------------------
log "trainer: training $TRAIN_STEPS steps into the bundles volume (skipped when a bundle is there)"
compose up --detach --no-deps trainer
code="$(timeout "$TIMEOUT" podman wait "${PROJECT}_trainer_1")" || die "trainer still running after $TIMEOUT s" 1
podman logs "${PROJECT}_trainer_1" 2>&1 | tail -n 3 >&2
[[ "$code" == 0 ]] || die "trainer exited $code (podman logs ${PROJECT}_trainer_1)" 1
t_trained=$(elapsed)

# --- 2. server ----------------------------------------------------------------------------------------------
log "server: starting, waiting for SERVING"
compose up --detach --no-deps server
t0=$(date +%s)
until podman exec "${PROJECT}_server_1" python /opt/polyhead/healthcheck.py >/dev/null 2>&1; do
    (($(date +%s) - t0 < TIMEOUT)) || die "server not SERVING after $TIMEOUT s (podman logs ${PROJECT}_server_1)" 1
    sleep 0.5
done
t_serving=$(($(date +%s) - t0))
log "server: SERVING $t_serving s after start"

# --- 3. updater and simulators ------------------------------------------------------------------------------
log "updater, simulator, simulator-new-task: starting"
compose up --detach --no-deps updater simulator simulator-new-task

# --- 4. serving? --------------------------------------------------------------------------------------------
NEW_TASK="${POLYHEAD_NEW_TASK:-cartpole-reversed}"
SIM_TASK="${POLYHEAD_SIM_TASK:-cartpole-long-pole}"
metric() {  # the value of one exact series line in the server's /metrics, 0 when absent
    curl -fsS --max-time 5 http://127.0.0.1:9100/metrics 2>/dev/null | awk -v s="$1" 'index($0, s " ") == 1 { v = $2 } END { print v + 0 }'
}
log "watching http://127.0.0.1:9100/metrics for Act calls on $SIM_TASK and a published $NEW_TASK head"
t0=$(date +%s)
while :; do
    sim_acts=$(metric "polyhead_requests_total{code=\"OK\",method=\"Act\",task=\"$SIM_TASK\"}")
    new_version=$(metric "polyhead_active_head_version{task=\"$NEW_TASK\"}")
    new_acts=$(metric "polyhead_requests_total{code=\"OK\",method=\"Act\",task=\"$NEW_TASK\"}")
    if awk -v a="$sim_acts" -v v="$new_version" -v n="$new_acts" 'BEGIN { exit !(a > 0 && v >= 1 && n > 0) }'; then
        break
    fi
    if (($(date +%s) - t0 > TIMEOUT)); then
        podman ps --all --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}} {{.Status}}' >&2
        die "after $TIMEOUT s: $SIM_TASK Act calls $sim_acts, $NEW_TASK head version $new_version, $NEW_TASK Act calls $new_acts" 1
    fi
    sleep 2
done
t_adapted=$(($(date +%s) - t0))
podman ps --all --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}  {{.Status}}' >&2
log "serving: $SIM_TASK Act calls $sim_acts; $NEW_TASK head version $new_version published by the updater after $t_adapted s, Act calls $new_acts"
log "stop with: deploy/podman/compose-up.sh --down"
if ((JSON)); then
    printf '{"train_s": %s, "server_start_to_serving_s": %s, "first_new_head_s": %s, "sim_task_act_calls": %s, "new_task_head_version": %s, "new_task_act_calls": %s}\n' \
        "$t_trained" "$t_serving" "$t_adapted" "$sim_acts" "$new_version" "$new_acts"
fi
