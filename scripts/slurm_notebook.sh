#!/bin/bash
# One paper notebook per GPU node, under the `paper` profile (docs/reproduce.md).
#
#   sbatch --job-name=table1 scripts/slurm_notebook.sh table1
#   for nb in training_dynamics table1 table3 table4 table7 table8; do
#       sbatch --job-name="$nb" scripts/slurm_notebook.sh "$nb"; done
#   # table2, table5 and table6 reuse table1's runs: submit them after it (--dependency=afterok:<table1 job id>)
#
# Step 1 trains the notebook's runs on all the node's GPUs (accelerate launch: every process walks the same grid,
# the Trainer shards each run's batches); step 2 executes the notebook, which loads those runs (the run hash
# covers the world size, hence MASS_DPO_TRAINED_WORLD_SIZE) and writes papers_figures/<notebook>/.
# Put the runs root and the caches on a shared filesystem so that every node sees every run.
#
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
NOTEBOOK="${1:?usage: sbatch scripts/slurm_notebook.sh NOTEBOOK}"
PROFILE="${PROFILE:-paper}"
GPUS="${SLURM_GPUS_ON_NODE:-8}"

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source .venv/bin/activate                     # or: conda activate mass-dpo
export MASS_DPO_CACHE="${MASS_DPO_CACHE:-$PWD/.cache/mass_dpo}"     # extraction cache + runs, on shared storage
export MASS_DPO_RUNS="${MASS_DPO_RUNS:-$MASS_DPO_CACHE/runs}"
export MASS_DPO_DATA="${MASS_DPO_DATA:-$PWD/data}"                  # lastfm/ movielens/ medmcqa/ qasc/
export HF_HOME="${HF_HOME:-$MASS_DPO_CACHE/hf}"                     # the 3-4B models (hub access or a pre-filled cache)
mkdir -p logs

# 1. train the notebook's runs on every GPU of the node (the quickstart has none to train)
if [ "$NOTEBOOK" != "quickstart" ]; then
    accelerate launch --multi_gpu --num_processes "$GPUS" -m mass_dpo.experiments "$NOTEBOOK" --profile "$PROFILE"
fi

# 2. execute the notebook headless; it loads the runs trained above
MASS_DPO_TRAINED_WORLD_SIZE="$GPUS" mass-dpo reproduce --profile "$PROFILE" --only "$NOTEBOOK"
