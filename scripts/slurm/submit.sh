#!/usr/bin/env bash
# Submit the whole pipeline (scripts/slurm/pipeline.sbatch) to Slurm from this repository's root,
# whichever folder this is run from. Options go to sbatch and override the script's #SBATCH lines:
#
#   scripts/slurm/submit.sh                          # as pipeline.sbatch says (2 nodes, 8 cores each)
#   scripts/slurm/submit.sh --nodes=4 --time=08:00:00
#   scripts/slurm/submit.sh --wait                   # return when the job ends, with its exit status
set -euo pipefail
if ! command -v sbatch >/dev/null 2>&1; then
    echo "submit.sh: sbatch not found: run this on a Slurm login node (or load the cluster's Slurm module)" >&2
    exit 127
fi
cd "$(dirname "$0")/../.." # the job runs in the folder it was submitted from: the repository's root
exec sbatch "$@" scripts/slurm/pipeline.sbatch
