#!/usr/bin/env bash
# Table 4 with error bars on SmolLM2-135M: the nine methods (GISP, one-shot GISP, LLM-Pruner, Wanda-sp, FLAP, OWL,
# ShortGPT, magnitude, random) at 20-50%, calibration seeds 0, 1, 2 (WikiText-2 validation, 32 x 128 tokens; GISP:
# the default 10-step linear schedule), WikiText-2 test perplexity at ctx 128 (the default 32 windows, the same for
# every run) with its standard error. One multirun of 27 jobs, two at a time with one thread each (joblib), from the
# repo root; 30 min on 2 CPU cores:
#   bash experiments/table4_seeds/run.sh
# GISP's trajectories land in the store and are shared with experiments/calibration_budget (its full-budget point).
set -euo pipefail
OUT=${OUT:-outputs/table4_seeds}
export WANDB_MODE=${WANDB_MODE:-offline} GISP_JOBS=${GISP_JOBS:-2}
python -m gisp.run -m experiment=table4_small 'seed=0,1,2' schedule.steps=10 '~eval.tasks.wikitext2_ppl_2048' \
  eval.tasks.wikitext2_ppl.max_windows=32 logger=csv progress=false threads=1 hydra/launcher=parallel \
  hydra.sweep.dir="$OUT" 'hydra.sweep.subdir=${pruner.name}_seed${seed}'
python experiments/collect.py "$OUT"/*_seed* --pivot wikitext2_ppl
