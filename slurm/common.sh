# shellcheck shell=bash
# Shared by the job scripts in slurm/: activate the Python environment and set job defaults.
# Sourced, not run.

# PYTHON_ENV: a conda environment name, or the path of a virtual environment (e.g. ~/venvs/unet).
# Empty: use whatever python is on PATH.
activate_python_env() {
    local env="${PYTHON_ENV:-}"
    if [[ -z "$env" ]]; then
        return 0
    fi
    if [[ -f "$env/bin/activate" ]]; then
        # shellcheck disable=SC1091
        source "$env/bin/activate"
    elif command -v conda >/dev/null 2>&1; then
        eval "$(conda shell.bash hook)"
        if ! conda activate "$env"; then
            echo "error: could not activate conda environment '$env' (PYTHON_ENV); check 'conda env list'" >&2
            exit 1
        fi
    else
        echo "error: PYTHON_ENV='$env' is neither a virtual environment (no $env/bin/activate) nor a conda" \
             "environment (conda is not on PATH; try 'module load conda' first)" >&2
        exit 1
    fi
    if ! python -c "import torch" 2>/dev/null; then
        echo "error: the environment '$env' has no torch; run 'pip install -r requirements.txt' in it" >&2
        exit 1
    fi
}

# The run folder's name: the job's name and id, which survive a requeue, so a requeued job finds its
# own run folder and resumes it. An array task is <name>-<array job id>_<task id>, like squeue shows it.
default_run_name() {
    local id="${SLURM_JOB_ID:-local}"
    if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
        id="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    fi
    echo "${SLURM_JOB_NAME:-$1}-$id"
}

# A job array is a sweep: task N adds the flags on line N of the file named by SWEEP (flags separated
# by spaces), or --seed N when SWEEP is unset. Fills TASK_FLAGS; empty outside an array.
TASK_FLAGS=()
array_task_flags() {
    local task="${SLURM_ARRAY_TASK_ID:-}" line
    if [[ -z "$task" ]]; then
        return 0
    fi
    if [[ -z "${SWEEP:-}" ]]; then
        TASK_FLAGS=(--seed "$task")
        return 0
    fi
    if [[ ! -f "$SWEEP" ]]; then
        echo "error: SWEEP=$SWEEP is not a file (give its path from the directory you ran sbatch in)" >&2
        exit 1
    fi
    line="$(sed -n "${task}p" "$SWEEP")"
    if [[ -z "$line" ]]; then
        echo "error: $SWEEP has no line $task for array task $task; submit --array=1-$(wc -l <"$SWEEP")" >&2
        exit 1
    fi
    # shellcheck disable=SC2034  # read by the job scripts that source this file
    read -r -a TASK_FLAGS <<<"$line"
}

# One line per attempt: a requeued job appends to the same log (--open-mode=append), and this line
# shows where each attempt starts.
job_banner() {
    echo "$(date '+%F %T') job ${SLURM_JOB_ID:-local} attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $(hostname): $*"
}

# Compute nodes usually have no internet: log wandb runs locally unless told otherwise.
# Upload them later from a login node with 'wandb sync runs/<name>/wandb/offline-run-*'.
export WANDB_MODE="${WANDB_MODE:-offline}"

# Run the given command in the background, forward SLURM's warning signal (USR1, or TERM on
# preemption) to it, and wait until it has written its checkpoint and exited. Returns its status;
# sets SIGNALLED=1 when a signal arrived.
SIGNALLED=0
run_forwarding_signals() {
    "$@" &
    local pid=$!
    trap 'SIGNALLED=1; echo "$(date +%T) job script: got USR1, asking pid '"$pid"' to save and stop"; kill -USR1 '"$pid"' 2>/dev/null || true' USR1
    trap 'SIGNALLED=1; echo "$(date +%T) job script: got TERM, asking pid '"$pid"' to save and stop"; kill -TERM '"$pid"' 2>/dev/null || true' TERM
    local status=0
    # wait returns early when a trapped signal arrives; keep waiting until the process has exited
    while true; do
        wait "$pid" && status=0 || status=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    return "$status"
}

# A job that was warned before its time limit goes back in the queue and resumes from last.pt; one
# that finished anyway (the signal came after the last step) is done. $1: the command's status.
requeue_if_signalled() {
    if [[ "$SIGNALLED" == 1 && "${1:-1}" != 0 && -n "${SLURM_JOB_ID:-}" ]]; then
        # An array task's SLURM_JOB_ID can equal the array's id, which names every task: requeue
        # <array id>_<task id>, this task alone.
        local job="$SLURM_JOB_ID"
        if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
            job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
        fi
        if command -v scontrol >/dev/null 2>&1; then
            echo "requeueing job $job; it will resume from its last checkpoint"
            scontrol requeue "$job"
        else
            echo "no scontrol here: resubmit with the same RUN_NAME to resume"
        fi
    fi
}
