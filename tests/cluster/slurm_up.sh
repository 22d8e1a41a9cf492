#!/usr/bin/env bash
# Start a real single-machine SLURM cluster for tests: slurmctld + two slurmd "nodes" (n1, n2) on this host.
#
# Usage: tests/cluster/slurm_up.sh [STATE_DIR]        (default /tmp/lightscale-slurm)
#        eval "$(tests/cluster/slurm_up.sh)"          # the last (only) stdout line is `export SLURM_CONF=...`
#
# Needs root (daemons run as root, munged as user munge). Installs slurm-wlm + munge with apt-get only when
# slurmctld is missing. Everything the cluster writes (conf, state, spool, logs, PID files) lives in
# STATE_DIR; tests/cluster/slurm_down.sh stops exactly the daemons whose PID files this script wrote.
# Idempotent: when this STATE_DIR's daemons are already running it only prints the export line.
# Progress goes to stderr so that stdout stays machine-readable.
#
# Tunables (environment): LIGHTSCALE_SLURM_CTLD_PORT (6817), LIGHTSCALE_SLURM_NODE_PORTS ("17001 17002"),
# LIGHTSCALE_SLURM_CPUS (4 per node), LIGHTSCALE_SLURM_MEM_MB (2048 per node), LIGHTSCALE_SLURM_WAIT_S (60),
# LIGHTSCALE_SLURM_CRED_EXPIRE (10 s; also the minimum delay before a requeued job restarts).
set -euo pipefail

STATE_DIR="$(realpath -m "${1:-/tmp/lightscale-slurm}")"
CONF="$STATE_DIR/slurm.conf"
CTLD_PORT="${LIGHTSCALE_SLURM_CTLD_PORT:-6817}"
read -r -a NODE_PORTS <<<"${LIGHTSCALE_SLURM_NODE_PORTS:-17001 17002}"
CPUS="${LIGHTSCALE_SLURM_CPUS:-4}"
MEM_MB="${LIGHTSCALE_SLURM_MEM_MB:-2048}"
WAIT_S="${LIGHTSCALE_SLURM_WAIT_S:-60}"
CRED_EXPIRE="${LIGHTSCALE_SLURM_CRED_EXPIRE:-10}"
NODES=(n1 n2)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { echo "[slurm_up] $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# alive PIDFILE COMM: the PID in PIDFILE is running and is the expected program (guards against PID reuse).
alive() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(<"$1")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/comm" && "$(<"/proc/$pid/comm")" == "$2" ]] || return 1
    local stat
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat:0:1}" != Z ]] # not a zombie
}

# wait_for SECONDS CMD...: poll CMD every 0.5 s until it succeeds.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

dump_logs() {
    local f
    for f in "$STATE_DIR"/log/*.log; do
        [[ -f "$f" ]] || continue
        log "---- tail $f"
        tail -n 20 "$f" >&2 || true
    done
}

# --- idempotency -----------------------------------------------------------------------------------------
all_up() {
    alive "$STATE_DIR/slurmctld.pid" slurmctld || return 1
    local n
    for n in "${NODES[@]}"; do alive "$STATE_DIR/slurmd-$n.pid" slurmd || return 1; done
}
if [[ -f "$CONF" ]] && all_up; then
    log "already up in $STATE_DIR"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi

# --- install ---------------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null 2>&1 && [[ ! -x /usr/sbin/slurmctld ]]; then
    if [[ "$(id -u)" -ne 0 ]]; then
        die "slurmctld is not installed and installing it needs root: run as root, or first" \
            "'apt-get install -y slurm-wlm munge' as root"
    fi
    command -v apt-get >/dev/null 2>&1 || die "slurmctld is not installed and apt-get is not available"
    log "installing slurm-wlm and munge with apt-get ..."
    t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq slurm-wlm munge >&2
    log "installed in $((SECONDS - t0)) s"
fi
export PATH="$PATH:/usr/sbin:/sbin"
[[ "$(id -u)" -eq 0 ]] || die "starting slurmctld/slurmd/munged needs root (daemons run as SlurmUser=root)"

# A half-running cluster from an earlier attempt: stop what we started there, then start clean.
if compgen -G "$STATE_DIR/*.pid" >/dev/null; then
    log "found stale PID files in $STATE_DIR; stopping that cluster first"
    "$HERE/slurm_down.sh" "$STATE_DIR" >&2
fi

# Another cluster (e.g. one started with a different STATE_DIR) holding our ports makes the daemons fail
# with obscure log lines; say so up front.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$CTLD_PORT" "${NODE_PORTS[@]}"; do
    if port_busy "$port"; then
        die "port $port on 127.0.0.1 is in use (another test cluster? stop it with" \
            "'tests/cluster/slurm_down.sh <its STATE_DIR>', or set LIGHTSCALE_SLURM_CTLD_PORT/NODE_PORTS)"
    fi
done

mkdir -p "$STATE_DIR"/{ctld,log} "${NODES[@]/#/$STATE_DIR/spool/}"

# --- munge -----------------------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 0700 /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_ok; then
    log "munged already running (not ours; slurm_down.sh will leave it alone)"
else
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 munge_ok || die "munged did not come up (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$STATE_DIR/munged.pid"  # marks munged as started by us
    log "started munged (pid $(<"$STATE_DIR/munged.pid"))"
fi

# --- slurm.conf ------------------------------------------------------------------------------------------
HOST="$(hostname -s)"
{
    cat <<EOF
# Written by tests/cluster/slurm_up.sh for a single-machine test cluster. Do not edit; rerun the script.
ClusterName=lightscale
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may not restart before its old credentials expire (default 120 s): short credential
# lifetime + fast scheduler passes restart it ~cred_expire+1 s after the requeue, not ~3 minutes.
AuthInfo=cred_expire=${CRED_EXPIRE}
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
KillWait=5
# sbatch --wait polls after 2, 8, 32, 32 ... s, growing the interval only while it is < MinJobAge/2:
# MinJobAge <= 5 keeps it at 2 s (with the default 300 a 12 s job returned after 42 s). Side effect:
# finished jobs vanish from squeue/scontrol ~5 s after they end (Slurm refuses values below 2).
MinJobAge=5
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=${STATE_DIR}/ctld
SlurmdSpoolDir=${STATE_DIR}/spool/%n
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/slurmd-%n.pid
SlurmctldLogFile=${STATE_DIR}/log/slurmctld.log
SlurmdLogFile=${STATE_DIR}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Declare more CPUs than the box has (each "node" is the same machine).
SlurmdParameters=config_overrides
EOF
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[$i]} NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]}" \
            "CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(
        IFS=,
        echo "${NODES[*]}"
    ) Default=YES MaxTime=INFINITE State=UP"
} >"$CONF"
export SLURM_CONF="$CONF"

# --- daemons ---------------------------------------------------------------------------------------------
# -c: start with an empty queue (no jobs recovered from an earlier cluster in this STATE_DIR).
slurmctld -c -f "$CONF"
wait_for 15 alive "$STATE_DIR/slurmctld.pid" slurmctld || {
    dump_logs
    die "slurmctld did not start"
}
for n in "${NODES[@]}"; do
    slurmd -f "$CONF" -N "$n"
    wait_for 15 alive "$STATE_DIR/slurmd-$n.pid" slurmd || {
        dump_logs
        die "slurmd $n did not start"
    }
done
log "daemons started: slurmctld $(<"$STATE_DIR/slurmctld.pid"), slurmd" \
    "$(for n in "${NODES[@]}"; do echo -n "$n=$(<"$STATE_DIR/slurmd-$n.pid") "; done)"

nodes_idle() {
    local states
    states="$(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u)" || return 1
    [[ "$states" == "$(printf '%s idle\n' "${NODES[@]}")" ]]
}
wait_for "$WAIT_S" nodes_idle || {
    sinfo -N >&2 || true
    dump_logs
    die "nodes not idle after ${WAIT_S} s"
}
log "cluster up: $(sinfo -h -o '%P %D %T' | tr '\n' ' ')"
echo "export SLURM_CONF=$CONF"
