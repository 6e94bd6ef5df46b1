#!/usr/bin/env bash
# Check a GPU node before training on it: the GPU tests, a quick benchmark (images/s, MFU, memory),
# a training run stopped by USR1 and resumed, and prediction (gpu_check.py).
#   mkdir -p logs && sbatch slurm/gpu_check.sh [gpu_check.py flags]
#   sbatch --partition=vgpu slurm/gpu_check.sh       # another partition's GPUs
# The logs and summary.md land in runs/<job name>-<job id>/ (--out DIR overrides); the job log ends with
# the summary table. Exit status: gpu_check.py's (0 passed, 1 a stage failed, 2 no CUDA GPU).
#
# Adjust the lines below for your cluster. Rangpur partitions: a100 (default), vgpu, comp3710.
#SBATCH --job-name=improved-unet-gpu-check
#SBATCH --partition=a100
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=32G
#SBATCH --time=00:30:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# shellcheck source=slurm/common.sh
source slurm/common.sh
activate_python_env

OUT="$(flag_value --out "runs/$(default_run_name gpu-check)" "$@")"
job_banner "checks $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || echo 'no nvidia-smi'); summary in $OUT/summary.md"
python gpu_check.py --out "$OUT" "$@"
