#!/usr/bin/env bash
# Stop the test cluster started by tests/cluster/slurm_up.sh [STATE_DIR] (default /tmp/lightscale-slurm).
#
# Cancels the cluster's jobs through Slurm (so job processes end too), then stops exactly the daemons whose
# PID files slurm_up.sh wrote in STATE_DIR: slurmd n1/n2, slurmctld, and munged only if slurm_up.sh started
# it. Never kills by name. Packages stay installed; STATE_DIR (conf, logs) is kept for post-mortems.
set -euo pipefail

STATE_DIR="$(realpath -m "${1:-/tmp/lightscale-slurm}")"
CONF="$STATE_DIR/slurm.conf"
STOP_WAIT_S="${LIGHTSCALE_SLURM_STOP_WAIT_S:-20}"
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "[slurm_down] $*" >&2; }

# running PID: exists and is not a zombie (PID 1 in some containers does not reap orphans promptly).
running() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat:0:1}" != Z ]]
}

# pid_of PIDFILE COMM: print the PID if it is running and is the expected program (guards against PID reuse).
pid_of() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(<"$1")"
    [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/comm" && "$(<"/proc/$pid/comm")" == "$2" ]] || return 1
    running "$pid" || return 1
    echo "$pid"
}

# 1. Cancel remaining jobs while the controller is still there, and give them KillWait to end.
if [[ -f "$CONF" ]] && pid_of "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null; then
    mapfile -t jobs < <(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null || true)
    if ((${#jobs[@]})); then
        log "cancelling jobs: ${jobs[*]}"
        SLURM_CONF="$CONF" scancel "${jobs[@]}" 2>/dev/null || true
        deadline=$((SECONDS + STOP_WAIT_S))
        while ((SECONDS < deadline)) && [[ -n "$(SLURM_CONF="$CONF" squeue -h -t R,CG,S -o %i 2>/dev/null)" ]]; do
            sleep 0.5
        done
    fi
fi

# 2. Stop daemons: nodes first, then the controller, then munged (only if ours).
stop() {
    local pidfile="$1" comm="$2" pid deadline
    if pid="$(pid_of "$pidfile" "$comm")"; then
        log "stopping $comm (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + STOP_WAIT_S))
        while running "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
        if running "$pid"; then
            log "$comm (pid $pid) ignored SIGTERM for ${STOP_WAIT_S} s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            while running "$pid"; do sleep 0.1; done
        fi
    fi
    rm -f "$pidfile"
}
for pidfile in "$STATE_DIR"/slurmd-*.pid; do
    [[ -e "$pidfile" ]] && stop "$pidfile" slurmd
done
stop "$STATE_DIR/slurmctld.pid" slurmctld
stop "$STATE_DIR/munged.pid" munged
log "down ($STATE_DIR kept)"
