#!/usr/bin/env bash
# Table 4 on Qwen2.5-Coder-0.5B-Instruct: the nine methods at 20-50% with the default run's calibration (Austen,
# 16 x 128 tokens; GISP: the default 10-step linear schedule), WikiText-2 test perplexity at ctx 128 (32 windows) with
# its standard error. GISP's trajectory is the default run's (`python -m gisp.run model=qwen2_5_coder_0_5b`), read
# from the store when that run was made. SEEDS="0 1 2" for error bars (about 3x the time); METHODS=gisp,owl,... for
# a subset. Needs `make install-qwen`.
# About 15 min per seed for six methods on 2 CPU cores (two jobs at a time, one thread each):
#   bash experiments/table4_qwen/run.sh
set -euo pipefail
OUT=${OUT:-outputs/table4_qwen}
SEEDS=${SEEDS:-0}
METHODS=${METHODS:-gisp,oneshot,llm_pruner,wanda_sp,flap,owl,shortgpt,magnitude,random}
export WANDB_MODE=${WANDB_MODE:-offline} GISP_JOBS=${GISP_JOBS:-2}
python -m gisp.run -m model=qwen2_5_coder_0_5b "seed=${SEEDS// /,}" \
  "pruner=$METHODS" '~eval.tasks.wikitext2_ppl_2048' \
  logger=csv progress=false threads=1 hydra/launcher=parallel hydra.sweep.dir="$OUT" \
  'hydra.sweep.subdir=${pruner.name}_seed${seed}'
python experiments/collect.py "$OUT"/*_seed* --pivot wikitext2_ppl
