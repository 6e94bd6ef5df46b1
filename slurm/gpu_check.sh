#!/usr/bin/env bash
# Check a GPU node before training on it: the GPU tests, a quick benchmark (images/s, MFU, memory),
# a training run stopped by USR1 and resumed, fp32, bf16 and fp16 training, and prediction (gpu_check.py).
#   mkdir -p logs && sbatch slurm/gpu_check.sh [gpu_check.py flags]
#   sbatch --partition=a100 slurm/gpu_check.sh       # another partition's GPUs (here: no 20-minute limit)
# It runs on a100-test, whose 20 minutes it fits: gpu_check.py ends every stage a minute before the job's
# time limit and rewrites summary.md after each stage, so a slow stage costs the ones after it, not the summary.
# The logs and summary.md land in runs/<job name>-<job id>/ (--out DIR overrides); the job log ends with
# the summary table. Exit status: gpu_check.py's (0 passed, 1 a stage failed, 2 no CUDA GPU).
#
# Rangpur (UQ), as its users reported it in September and October 2026: each A100 node (a100-0 ..
# a100-9: one A100-PCIE-40GB, 8 cores) serves three partitions:
#   a100       any account
#   comp3710   the course's account only: sbatch --partition=comp3710 --account=comp3710 slurm/train.sh ...
#              (without --account the job waits for good, reason PartitionConfig)
#   a100-test  20 minutes, one job per user, usually the quickest to start. The default here.
# No memory request: Rangpur's nodes declare none (RealMemory=1), and a job that asks for memory is
# refused. On a cluster that tracks memory, add '#SBATCH --mem=32G' below (or pass --mem to sbatch).
# Flags given to sbatch override these lines (docs/slurm.md: adapting the header to another cluster).
#SBATCH --job-name=improved-unet-gpu-check
#SBATCH --partition=a100-test
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --time=00:20:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# shellcheck source=slurm/common.sh
source slurm/common.sh
activate_python_env

OUT="$(flag_value --out "runs/$(default_run_name gpu-check)" "$@")"
job_banner "checks $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || echo 'no nvidia-smi'); summary in $OUT/summary.md"
python gpu_check.py --out "$OUT" "$@"
