#!/usr/bin/env bash
# Train on several GPUs with DistributedDataParallel: all GPUs of each node, across the job's nodes.
#   mkdir -p logs && sbatch slurm/train_multigpu.sh [train.py flags]        # two nodes, one GPU each
#   sbatch --nodes=4 slurm/train_multigpu.sh ...                            # four
#   sbatch --nodes=1 --gres=gpu:4 slurm/train_multigpu.sh ...               # four GPUs of one node
# Rangpur's nodes hold one GPU each, so its multi-GPU jobs span nodes: --nodes=2 --gres=gpu:1 below.
# One srun task per node starts torchrun, which starts one process per GPU; the nodes meet at a
# c10d rendezvous on the first node of the allocation, on a port derived from the job id (MASTER_PORT
# overrides), so jobs that share a node never meet at one. --batch-size is per GPU.
#
# Rangpur (UQ), as its users reported it in September and October 2026: each A100 node (a100-0 ..
# a100-9: one A100-PCIE-40GB, 8 cores) serves three partitions:
#   a100       any account. The default here, because every account may use it.
#   comp3710   the course's account only: sbatch --partition=comp3710 --account=comp3710 slurm/train_multigpu.sh ...
#              (without --account the job waits for good, reason PartitionConfig)
#   a100-test  20 minutes, one job per user, usually the quickest to start: for checks
# No memory request: Rangpur's nodes declare none (RealMemory=1), and a job that asks for memory is
# refused. On a cluster that tracks memory, add '#SBATCH --mem=64G' below (or pass --mem to sbatch).
# Flags given to sbatch override these lines (docs/slurm.md: adapting the header to another cluster).
#SBATCH --job-name=improved-unet-ddp
#SBATCH --partition=a100
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# shellcheck source=slurm/common.sh
source slurm/common.sh
activate_python_env

array_task_flags
run_folder improved-unet-ddp "$@" "${TASK_FLAGS[@]}"
NNODES="${SLURM_NNODES:-1}"
# Processes per node: the job's GPUs on this node (job_gpus_on_node in slurm/common.sh);
# NPROC_PER_NODE overrides (e.g. CPU tests).
NPROC_PER_NODE="${NPROC_PER_NODE:-$(job_gpus_on_node)}"
if [[ "$NPROC_PER_NODE" -lt 1 ]]; then
    echo "error: no GPUs found on $(hostname); request them with --gres=gpu:N or set NPROC_PER_NODE" >&2
    exit 1
fi
if command -v scontrol >/dev/null 2>&1 && [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
else
    MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
fi
MASTER_PORT="$(rendezvous_port)"
job_banner "$NNODES node(s) x $NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT," \
           "trains into $RUN_DIR ${TASK_FLAGS[*]}"

# torchrun dies of USR1 unless told to handle it; told, it passes the signal to every rank and waits
# for them to save (up to the shutdown timeout), so last.pt is complete before srun ends the step.
# It then dies of a SignalException, whose traceback run_forwarding_signals keeps out of the log.
# Each flag is checked on its own: torchrun gained --shutdown-timeout releases after --signals-to-handle,
# and it refuses a flag it does not know. Without the timeout flag the ranks get torchrun's own 30 s.
torchrun=(torchrun)
torchrun_help="$(torchrun --help 2>/dev/null || true)"
if [[ "$torchrun_help" == *--signals-to-handle* ]]; then
    torchrun+=("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
else
    echo "warning: this torchrun cannot forward USR1 (PyTorch too old); a warned job may not save" >&2
fi
if [[ "$torchrun_help" == *--shutdown-timeout* ]]; then
    torchrun+=(--shutdown-timeout=100)
fi
launch=("${torchrun[@]}" --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --rdzv_id="${SLURM_JOB_ID:-local}"
        --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"
        train.py --resume auto --name "$RUN_NAME" "$@" "${TASK_FLAGS[@]}")
# srun does not pass the job's --cpus-per-task on to its step (Slurm 22.05 and later): without it every
# rank and its loader workers would share one core.
if command -v srun >/dev/null 2>&1 && [[ -n "${SLURM_JOB_ID:-}" ]]; then
    # Each node tells the others its SLURM node name as its address (--local-addr, evaluated on the node):
    # by default torchrun looks its own up from the hostname, which many nodes map to 127.0.0.1 in
    # /etc/hosts, and the other nodes' ranks would then wait for rank 0's store on their own loopback.
    if [[ "$torchrun_help" == *--local-addr* ]]; then
        # shellcheck disable=SC2016  # expanded on each node, not here
        launch=(bash -c 'exec "$0" --local-addr="${SLURMD_NODENAME:-$(hostname)}" "$@"' "${launch[@]}")
    fi
    launch=(srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} "${launch[@]}")
fi

status=0
run_forwarding_signals "${launch[@]}" || status=$?
requeue_if_signalled "$status"
exit "$status"
