#!/usr/bin/env bash
# Table 14 on SmolLM2-135M: how few calibration tokens and how few steps reach the full recipe's quality. GISP with
# Table 4's recipe (experiments/table4_seeds: WikiText-2 validation windows of 128 tokens, 10-step linear schedule,
# targets 20-50%), seeds 0, 1, 2:
#   budget: 2, 4, 8, 16 windows (1/16 .. 1/2 of the 32-window budget; 32 is table4_seeds' gisp, shared in the store)
#   steps:  1, 2, 5 steps at the full budget (the schedule still ends at 70% of structures)
# Evaluation: WikiText-2 test perplexity at ctx 128, the same 32 windows as table4_seeds. About 30 min on 2 cores:
#   bash experiments/calibration_budget/run.sh
set -euo pipefail
OUT=${OUT:-outputs/calibration_budget}
export WANDB_MODE=${WANDB_MODE:-offline} GISP_JOBS=${GISP_JOBS:-2}
COMMON=(experiment=table4_small pruner=gisp '~eval.tasks.wikitext2_ppl_2048' eval.tasks.wikitext2_ppl.max_windows=32
        logger=csv progress=false threads=1 hydra/launcher=parallel)
python -m gisp.run -m "${COMMON[@]}" 'seed=0,1,2' 'data.n_samples=2,4,8,16' schedule.steps=10 \
  hydra.sweep.dir="$OUT/budget" 'hydra.sweep.subdir=n${data.n_samples}_seed${seed}'
python -m gisp.run -m "${COMMON[@]}" 'seed=0,1,2' data.n_samples=32 'schedule.steps=1,2,5' \
  hydra.sweep.dir="$OUT/steps" 'hydra.sweep.subdir=steps${schedule.steps}_seed${seed}'
T4=${T4:-outputs/table4_seeds}
args=()
for n in 2 4 8 16; do for s in 0 1 2; do args+=("$OUT/budget/n${n}_seed$s=${n} x 128 tokens, 10 steps"); done; done
for s in 0 1 2; do args+=("$T4/gisp_seed$s=32 x 128 tokens, 10 steps"); done
for k in 1 2 5; do for s in 0 1 2; do args+=("$OUT/steps/steps${k}_seed$s=32 x 128 tokens, $k steps"); done; done
python experiments/collect.py "${args[@]}" --pivot wikitext2_ppl
