#!/usr/bin/env bash
# Train on one GPU of a SLURM cluster (set up for UQ's Rangpur). From the repository root:
#   mkdir -p logs && sbatch slurm/train.sh [train.py flags, e.g. --data-dir data/ISIC2018 --epochs 100]
# The run folder is runs/<job name>-<job id>, or runs/NAME with --name NAME; the log's first line says which.
# Before the time limit SLURM sends USR1; the run saves last.pt, the job is requeued and resumes.
# A sweep, one run folder per array task (see SWEEP in slurm/common.sh):
#   SWEEP=seeds.txt sbatch --array=1-3 --output=logs/%x-%A_%a.out slurm/train.sh [train.py flags]
#
# Adjust the lines below for your cluster. Rangpur partitions: a100 (default), vgpu, comp3710.
#SBATCH --job-name=improved-unet
#SBATCH --partition=a100
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=32G
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
