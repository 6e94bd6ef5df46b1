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
    # Activation scripts (conda's above all, and its packages' activate.d hooks) read variables that may
    # be unset; under the job scripts' set -u that would end the job before training. Relaxed here only.
    local strict=0
    [[ $- == *u* ]] && strict=1 && set +u
    # conda: on PATH, else where the active shell found it, else a Miniconda in home (Rangpur has no conda module)
    local conda
    conda="$(command -v conda 2>/dev/null || true)"
    [[ -n "$conda" || -z "${CONDA_EXE:-}" ]] || conda="$CONDA_EXE"
    [[ -n "$conda" || ! -x "$HOME/miniconda3/bin/conda" ]] || conda="$HOME/miniconda3/bin/conda"
    if [[ -f "$env/bin/activate" ]]; then
        # shellcheck disable=SC1091
        source "$env/bin/activate"
    elif [[ -n "$conda" ]]; then
        eval "$("$conda" shell.bash hook)"
        if ! conda activate "$env"; then
            echo "error: could not activate conda environment '$env' (PYTHON_ENV); check 'conda env list'" >&2
            exit 1
        fi
    else
        echo "error: PYTHON_ENV='$env' is neither a virtual environment (no $env/bin/activate) nor a conda" \
             "environment (no conda on PATH nor in ~/miniconda3; run 'source ~/miniconda3/bin/activate' first)" >&2
        exit 1
    fi
    ((strict == 0)) || set -u
    if ! python -c "import torch" 2>/dev/null; then
        echo "error: the environment '$env' has no torch; run 'pip install -r requirements.txt' in it" >&2
        exit 1
    fi
}

# The run folder's default name: the job's name and id, which survive a requeue, so a requeued job finds
# its own run folder and resumes it. An array task is <name>-<array job id>_<task id>, like squeue shows it.
default_run_name() {
    local id="${SLURM_JOB_ID:-local}"
    if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
        id="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    fi
    echo "${SLURM_JOB_NAME:-$1}-$id"
}

# The value the script's own flags give FLAG (the last one wins, as in argparse: "--name x" or "--name=x"),
# else $2. Usage: flag_value --name DEFAULT "$@"
flag_value() {
    local flag="$1" value="$2"
    shift 2
    while (($#)); do
        case "$1" in
            "$flag") (($# > 1)) && value="$2" && shift ;;
            "$flag"=*) value="${1#*=}" ;;
        esac
        shift
    done
    echo "$value"
}

# The run folder that train.py will write, as it will name it: --out-dir (default runs) and --name,
# else RUN_NAME, else default_run_name. Sets RUN_NAME and RUN_DIR; $1 is the job's default name.
run_folder() {
    local fallback="$1"
    shift
    RUN_NAME="$(flag_value --name "${RUN_NAME:-$(default_run_name "$fallback")}" "$@")"
    # shellcheck disable=SC2034  # read by the job scripts that source this file
    RUN_DIR="$(flag_value --out-dir runs "$@")/$RUN_NAME"
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

# An array task of a prediction job segments its part of the folder: predict.py --parts (the array's
# task count) --part (this task's place among the array's ids: --array=0-3, 1-4 and 0-9:3 alike).
# Fills PART_FLAGS; empty outside an array.
PART_FLAGS=()
array_part_flags() {
    local task="${SLURM_ARRAY_TASK_ID:-}"
    if [[ -z "$task" ]]; then
        return 0
    fi
    # shellcheck disable=SC2034  # read by slurm/predict.sh
    PART_FLAGS=(--parts "${SLURM_ARRAY_TASK_COUNT:-1}"
                --part $(((task - ${SLURM_ARRAY_TASK_MIN:-$task}) / ${SLURM_ARRAY_TASK_STEP:-1} + 1)))
}

# One line per attempt: a requeued job appends to the same log (--open-mode=append), and this line
# shows where each attempt starts.
job_banner() {
    echo "$(date '+%F %T') job ${SLURM_JOB_ID:-local} attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $(hostname): $*"
}

# Compute nodes usually have no internet: log wandb runs locally unless told otherwise.
# Upload them later from a login node with 'wandb sync runs/<name>/wandb/offline-run-*'.
export WANDB_MODE="${WANDB_MODE:-offline}"

# GPUs of this job on this node: SLURM's count, else the devices SLURM made visible to the job, else
# (outside SLURM) every GPU the node shows. nvidia-smi alone would count GPUs that belong to other
# jobs on a shared node. CUDA ignores the entries from the first invalid one on (-1 hides all).
job_gpus_on_node() {
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
        return 0
    fi
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        local devices device count=0
        IFS=, read -r -a devices <<<"$CUDA_VISIBLE_DEVICES"
        for device in "${devices[@]}"; do
            [[ -n "$device" && "$device" != -* && "$device" != NoDevFiles ]] || break
            count=$((count + 1))
        done
        echo "$count"
        return 0
    fi
    # one "GPU N: ..." line per GPU; MIG devices add indented lines, not counted
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
}

# The c10d rendezvous port: MASTER_PORT if set, else one of the job's own, 15000 + job id mod 10000
# (as PyTorch Lightning derives it). A fixed port lets a second job on the node join the first one's
# store and fail when that job ends; every node of a job computes the same number. 15000-24999 stays
# below Linux's ephemeral range (32768-60999), where outgoing connections take their ports.
rendezvous_port() {
    if [[ -n "${MASTER_PORT:-}" ]]; then
        echo "$MASTER_PORT"
    elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
        echo $((15000 + SLURM_JOB_ID % 10000))
    else
        echo 29500
    fi
}

# Copies one stream of the job's output (stdin) to stdout line by line, except torchrun's own traceback after a
# signal: told to handle USR1, torchrun passes it to the ranks, waits for them to save, then dies of a
# SignalException whose 28-line traceback reads like a crash. That block, and srun's report of
# torchrun's exit after it, go to $1/held instead; run_forwarding_signals prints them unless the job
# script sent the signal. Writes where train.py stopped ("epoch E, step S") to $1/stopped.
filter_job_output() {
    local dir="$1" line block=() holding=0
    # SLURM may signal every process of the job (preemption, scancel --signal without --batch); the
    # filter must outlive the command, or the command's next line would meet a closed pipe
    trap '' USR1 TERM INT HUP
    while IFS= read -r line || [[ -n "$line" ]]; do
        if ((${#block[@]})); then
            block+=("$line")
            # a traceback's frames are indented; its first unindented line names the exception
            if [[ -z "$line" || "$line" == [[:space:]]* ]]; then
                continue
            fi
            if [[ "$line" == *"SignalException: Process "*" got signal: "* ]]; then
                printf '%s\n' "${block[@]}" >>"$dir/held"
                holding=1
            else
                printf '%s\n' "${block[@]}"
            fi
            block=()
            continue
        fi
        if [[ "$line" == "Traceback (most recent call last):" ]]; then
            block=("$line")
        elif [[ "$holding" == 1 && "$line" == "srun: "* ]]; then
            printf '%s\n' "$line" >>"$dir/held"
        else
            printf '%s\n' "$line"
            if [[ "$line" =~ stopped\ by\ SIG[A-Z0-9]+\ at\ (epoch\ [0-9]+,\ step\ [0-9]+) ]]; then
                echo "${BASH_REMATCH[1]}" >"$dir/stopped"
            elif [[ "$line" =~ stopped\ by\ a\ signal\ after\ epoch\ ([0-9]+) ]]; then
                echo "the end of epoch ${BASH_REMATCH[1]}" >"$dir/stopped"
            fi
        fi
    done
    ((${#block[@]} == 0)) || printf '%s\n' "${block[@]}"
}

# Run the given command in the background, forward SLURM's warning signal (USR1, or TERM on
# preemption) to it, and wait until it has written its checkpoint and exited. Its output goes through
# filter_job_output, stdout and stderr apart, so that a job's --error file still gets the errors.
# Returns its status; sets SIGNALLED=1 and SIGNAL_NAME when a signal arrived, and STOPPED_AT to where
# training stopped, if it said so.
SIGNALLED=0
SIGNAL_NAME=
STOPPED_AT=
run_forwarding_signals() {
    local work filters=() pid status=0 final waits=0
    work="$(mktemp -d "${TMPDIR:-/tmp}/job-output.XXXXXX")"
    mkfifo "$work/output" "$work/errors"
    filter_job_output "$work" <"$work/output" &
    filters+=($!)
    filter_job_output "$work" <"$work/errors" >&2 &
    filters+=($!)
    "$@" >"$work/output" 2>"$work/errors" &
    pid=$!
    trap 'SIGNALLED=1; SIGNAL_NAME=SIGUSR1; echo "$(date +%T) job script: got USR1, asking pid '"$pid"' to save and stop"; kill -USR1 '"$pid"' 2>/dev/null || true' USR1
    trap 'SIGNALLED=1; SIGNAL_NAME=SIGTERM; echo "$(date +%T) job script: got TERM, asking pid '"$pid"' to save and stop"; kill -TERM '"$pid"' 2>/dev/null || true' TERM
    # wait returns early (128 + signal) when a trapped signal arrives; keep waiting until the process
    # has exited, and then take its own status, which bash keeps for a later wait: a signal that
    # interrupted the last wait as the command ended must not turn its success into 138
    while true; do
        wait "$pid" && status=0 || status=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    if ((status > 128)); then
        wait "$pid" 2>/dev/null && final=0 || final=$?
        ((final == 127)) || status=$final
    fi
    # A filter ends when the last writer closes its pipe; a helper the command left behind (a
    # logger's service process) may hold it open, so give them 10 s.
    while kill -0 "${filters[@]}" 2>/dev/null && ((waits++ < 20)); do
        sleep 0.5
    done
    kill -KILL "${filters[@]}" 2>/dev/null || true
    wait "${filters[@]}" 2>/dev/null || true
    STOPPED_AT="$(cat "$work/stopped" 2>/dev/null || true)"
    if [[ "$SIGNALLED" != 1 && -s "$work/held" ]]; then
        cat "$work/held" >&2
    fi
    rm -rf "$work"
    # kept until here: a late signal must not kill the script while the filter finishes
    trap - USR1 TERM
    return "$status"
}

# A job that was warned before its time limit (USR1), or preempted with a grace time (TERM while it
# still runs), goes back in the queue and resumes from last.pt. One that finished anyway (the signal
# came after the last step) is done, and so is one that SLURM is already ending: scancel and the time
# limit itself send TERM too, with the job COMPLETING; a requeue would bring a cancelled job back.
# $1: the command's status.
requeue_if_signalled() {
    if [[ "$SIGNALLED" != 1 || "${1:-1}" == 0 || -z "${SLURM_JOB_ID:-}" ]]; then
        return 0
    fi
    # An array task's SLURM_JOB_ID can equal the array's id, which names every task: requeue
    # <array id>_<task id>, this task alone.
    local job="$SLURM_JOB_ID" state resume="${RESUME_HOW:-resubmit with RUN_NAME=${RUN_NAME:-<run folder name>} to resume}"
    if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
        job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    fi
    if ! command -v scontrol >/dev/null 2>&1; then
        echo "no scontrol here: $resume"
        return 0
    fi
    state="$(scontrol -o show job "$job" 2>/dev/null | grep -o 'JobState=[A-Z_]*' || true)"
    if [[ -n "$state" && "$state" != JobState=RUNNING ]]; then
        echo "job $job is ending (${state#JobState=}: scancel or the time limit), so it is not requeued; $resume"
        return 0
    fi
    # said before the requeue, which ends this script
    if [[ -n "$STOPPED_AT" ]]; then
        echo "requeueing job $job after $SIGNAL_NAME: last.pt saved at $STOPPED_AT; the job continues from there"
    else
        echo "requeueing job $job after $SIGNAL_NAME; the job continues ${CONTINUES_FROM:-from its last checkpoint}"
    fi
    scontrol requeue "$job" || echo "error: 'scontrol requeue $job' failed; $resume" >&2
}
