#!/usr/bin/env bash
# Check a job with `lightscale preflight`, then submit it: what would crash at minute one fails here instead,
# before the job waits in the queue. Run from the repository root with lightscale's environment active.
#
#   slurm/submit.sh [sbatch options] CONFIG [lightscale fit overrides]
#   slurm/submit.sh --nodes=2 --time=12:00:00 configs/experiment/gpt2-124m.yaml --trainer.max_steps 10000
#   slurm/submit.sh --sweep slurm/sweeps/digits-lr.yaml [sbatch options] CONFIG [overrides]   (array sized for you)
#   slurm/submit.sh --wandb-sweep ENTITY/PROJECT/ID --array=0-7 [sbatch options] CONFIG [overrides]
#
# sbatch options come before CONFIG and are written --option=value (or a short flag like --exclusive); they
# override the #SBATCH header of slurm/train.sbatch (slurm/sweep.sbatch for sweeps), and preflight checks
# the result. Environment: LIGHTSCALE_PREFLIGHT=0 skips the check (not recommended); PREFLIGHT_ARGS adds
# options to it (e.g. "--gpu-mem-gb 80" or "--no-step").
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT="$HERE/train.sbatch"
SWEEP=""
SBATCH_OPTS=()
RESOURCES=()
usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
    exit "${1:-2}"
}
while (($#)); do
    case "$1" in
        -h | --help) usage 0 ;;
        --sweep=* | --wandb-sweep=*) SWEEP="${1#*=}"; [[ "$1" == --wandb-sweep=* ]] && SWEEP="wandb:$SWEEP"; shift ;;
        --sweep) SWEEP="${2:?--sweep needs a file}"; shift 2 ;;
        --wandb-sweep) SWEEP="wandb:${2:?--wandb-sweep needs ENTITY/PROJECT/ID}"; shift 2 ;;
        --nodes=* | --ntasks-per-node=* | --gpus-per-node=* | --gres=* | --ntasks=*)
            RESOURCES+=("$1"); SBATCH_OPTS+=("$1"); shift ;;
        -N* | -n* | -G*) echo "submit.sh: write $1 as a long option (--nodes=, --ntasks=, --gpus=)" >&2; exit 2 ;;
        -*) SBATCH_OPTS+=("$1"); shift ;;
        *) break ;;
    esac
done
(($#)) || usage
CONFIG="$1"
shift
[[ -f "$CONFIG" ]] || { echo "submit.sh: config $CONFIG not found (run from the repository root?)" >&2; exit 2; }

ARGS=("$CONFIG" "$@")
SWEEP_PREFLIGHT=()
if [[ -n "$SWEEP" ]]; then
    SCRIPT="$HERE/sweep.sbatch"
    ARGS=("$SWEEP" "$CONFIG" "$@")
    if [[ "$SWEEP" != wandb:* ]]; then
        SWEEP_PREFLIGHT=(--sweep "$SWEEP")
        if ! printf '%s\n' "${SBATCH_OPTS[@]}" | grep -q -- '^--array='; then
            POINTS="$(python -m lightscale.cluster.sweep count "$SWEEP")"
            SBATCH_OPTS+=("--array=0-$((POINTS - 1))")
        fi
    elif ! printf '%s\n' "${SBATCH_OPTS[@]}" | grep -q -- '^--array='; then
        echo "submit.sh: --wandb-sweep needs --array=0-N (how many points to run)" >&2
        exit 2
    fi
fi

if [[ "${LIGHTSCALE_PREFLIGHT:-1}" != 0 ]]; then
    # shellcheck disable=SC2086 # PREFLIGHT_ARGS is a list of options
    lightscale preflight --sbatch "$SCRIPT" --from-slurm "${RESOURCES[@]}" "${SWEEP_PREFLIGHT[@]}" \
        ${PREFLIGHT_ARGS:-} --config "$CONFIG" "$@" || {
        echo "submit.sh: preflight failed; nothing was submitted" >&2
        exit 2
    }
fi
JOB="$(sbatch --parsable "${SBATCH_OPTS[@]}" "$SCRIPT" "${ARGS[@]}")" || exit $?
JOB="${JOB%%;*}"
echo "submitted job $JOB ($(basename "$SCRIPT"))"
echo "  watch:   squeue -j $JOB   |   tail -f slurm-*-$JOB*.out   |   scontrol show job $JOB"
echo "  run dir: cat .lightscale/slurm/$JOB*.rundir   (written when the job starts)"
