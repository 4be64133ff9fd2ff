#!/usr/bin/env bash
# Table 4 with error bars on SmolLM2-135M: the nine methods (GISP, one-shot GISP, LLM-Pruner, Wanda-sp, FLAP, OWL,
# ShortGPT, magnitude, random) at 20-50%, calibration seeds 0, 1, 2 (WikiText-2 valid, 32 x 128 tokens; GISP 20
# steps), WikiText-2 test perplexity at ctx 128 (64 windows) and 2048 (2 windows) with its standard error. One
# multirun, from the repo root, ~2.5 h on 2 CPU cores:
#   bash experiments/table4_seeds/run.sh
set -euo pipefail
OUT=${OUT:-outputs/table4_seeds}
export WANDB_MODE=${WANDB_MODE:-offline}
python -m gisp.run -m experiment=table4_small 'seed=0,1,2' logger=csv progress=false hydra.sweep.dir="$OUT" \
  'hydra.sweep.subdir=${pruner.name}_seed${seed}'
python experiments/collect.py "$OUT"/*_seed* --pivot wikitext2_ppl
python experiments/collect.py "$OUT"/*_seed* --pivot wikitext2_ppl_2048
