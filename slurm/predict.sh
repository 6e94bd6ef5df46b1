#!/usr/bin/env bash
# Segment a folder of images with a trained checkpoint and, given ground truth, score them.
#   mkdir -p logs && sbatch slurm/predict.sh --checkpoint runs/NAME/best.pt --input DIR [--masks DIR] --output OUT
# All flags go to predict.py; see `python predict.py --help`.
#
# A warned or preempted job is requeued and skips the masks it already wrote. A large folder splits
# across an array job, one part per task (predict.py --parts/--part from the array), into one OUT:
#   sbatch --array=1-4 --output=logs/%x-%A_%a.out slurm/predict.sh --input DIR --output OUT ...
# then score the whole folder once every part is done (no image is segmented again):
#   sbatch --dependency=afterok:ARRAY_JOB_ID slurm/predict.sh --input DIR --masks TRUTH --output OUT ...
#
# Partition a100 (any account) and no memory request, for Rangpur: see slurm/train.sh.
#SBATCH --job-name=improved-unet-predict
#SBATCH --partition=a100
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --time=00:30:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# shellcheck source=slurm/common.sh
source slurm/common.sh
activate_python_env

array_part_flags
job_banner "python predict.py $* ${PART_FLAGS[*]}"

# shellcheck disable=SC2034  # read by requeue_if_signalled in slurm/common.sh
RESUME_HOW="resubmit the same command: the masks already written are skipped" CONTINUES_FROM="with the masks not yet written"
status=0
run_forwarding_signals python predict.py "$@" "${PART_FLAGS[@]}" || status=$?
requeue_if_signalled "$status"
exit "$status"
