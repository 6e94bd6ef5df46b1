#!/usr/bin/env bash
# Train on one GPU of a SLURM cluster (set up for UQ's Rangpur). From the repository root:
#   mkdir -p logs && sbatch slurm/train.sh [train.py flags, e.g. --data-dir data/ISIC2018 --epochs 100]
# The run folder is runs/<job name>-<job id>, or runs/NAME with --name NAME; the log's first line says which.
# Before the time limit SLURM sends USR1; the run saves last.pt, the job is requeued and resumes.
# A job given a GPU that PyTorch cannot use stops at once with one line (devices.py), instead of training on
# the CPU for days; pass --device cpu to mean it. A run that has already finished says so and exits 0.
# A sweep, one run folder per array task (see SWEEP in slurm/common.sh):
#   SWEEP=seeds.txt sbatch --array=1-3 --output=logs/%x-%A_%a.out slurm/train.sh [train.py flags]
#
# Rangpur (UQ), as its users reported it in September and October 2026: each A100 node (a100-0 ..
# a100-9: one A100-PCIE-40GB, 8 cores) serves three partitions:
#   a100       any account. The default here, because every account may use it.
#   comp3710   the course's account only: sbatch --partition=comp3710 --account=comp3710 slurm/train.sh ...
#              (without --account the job waits for good, reason PartitionConfig)
#   a100-test  20 minutes, one job per user, usually the quickest to start: for checks
# No memory request: Rangpur's nodes declare none (RealMemory=1), and a job that asks for memory is
# refused. On a cluster that tracks memory, add '#SBATCH --mem=32G' below (or pass --mem to sbatch).
# Flags given to sbatch override these lines (docs/slurm.md: adapting the header to another cluster).
#SBATCH --job-name=improved-unet
#SBATCH --partition=a100
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
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
run_folder improved-unet "$@" "${TASK_FLAGS[@]}"
job_banner "trains into $RUN_DIR ${TASK_FLAGS[*]}"

status=0
run_forwarding_signals python train.py --resume auto --name "$RUN_NAME" "$@" "${TASK_FLAGS[@]}" || status=$?
requeue_if_signalled "$status"
exit "$status"
