#!/usr/bin/env bash
# Segment a folder of images with a trained checkpoint and, given ground truth, score them.
#   mkdir -p logs && sbatch slurm/predict.sh --checkpoint runs/NAME/best.pt --input DIR [--masks DIR]
# All flags go to predict.py; see `python predict.py --help`.
#SBATCH --job-name=improved-unet-predict
#SBATCH --partition=a100
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=00:30:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# shellcheck source=slurm/common.sh
source slurm/common.sh
activate_python_env

echo "$(date +%T) job ${SLURM_JOB_ID:-local} on $(hostname): python predict.py $*"
python predict.py "$@"
