#!/usr/bin/env bash
# Download ISIC 2018 Task 1 zips in a job, not on a login node (on Rangpur, compute and downloads belong
# in jobs; the cpu partition has no GPU to waste). All flags go to download.py.
#   mkdir -p logs && sbatch slurm/download.sh --root data/isic-truth --splits val test --masks-only
# On Rangpur the course's copy (/home/groups/comp3710/ISIC2018) already holds the training pairs and the
# test images: the line above fetches only what it lacks, the official ground truth, to score
# predictions of the test images. The whole set (--splits train val test, about 11 GB) rarely fits a
# home folder of 16 GB. An interrupted download resumes when the job is submitted again; some mirrors are
# slow from the cluster, hence the 4 hours.
#SBATCH --job-name=improved-unet-download
#SBATCH --partition=cpu
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# shellcheck source=slurm/common.sh
source slurm/common.sh
activate_python_env

job_banner "python download.py $*"
python download.py "$@"
