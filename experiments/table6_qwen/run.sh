#!/usr/bin/env bash
# Table 6 (objective ablation) on Qwen2.5-Coder-0.5B-Instruct, which is above chance on CMQA (SmolLM2 is not):
# GISP calibrated on CMQA questions (every option; 3,072 tokens: each task's 1/7 share must hold one BoolQ question
# with both options, up to 403 Qwen tokens) with the perplexity
# objective vs the margin objective, seeds 0, 1, 2 (10-step linear schedule). The 30% level is evaluated with
# gisp.evaluate on the held-out CMQA parts, the first LIMIT items of each of the seven tasks (the same items for
# every run), and by WikiText-2 test perplexity at ctx 128 (32 windows). Generic text for reference: the default run
# (`python -m gisp.run model=qwen2_5_coder_0_5b hydra.run.dir=outputs/qwen_default`: Austen, 16 x 128 tokens,
# perplexity, seed 0) at 30%, when QWEN_DEFAULT (default outputs/qwen_default) holds a finished run. Needs
# `make install-qwen`. About 1 h on 2 CPU cores:
#   bash experiments/table6_qwen/run.sh
set -euo pipefail
OUT=${OUT:-outputs/table6_qwen}
LIMIT=${LIMIT:-30}
SEEDS=${SEEDS:-"0 1 2"}
export WANDB_MODE=${WANDB_MODE:-offline}
EVAL=(eval=[wikitext2,cmqa] '~eval.tasks.wikitext2_ppl_2048' eval.tasks.cmqa.limit=$LIMIT targets=[0.3] threads=2
      logger=csv progress=false)
for seed in $SEEDS; do
  for objective in ppl margin; do
    python -m gisp.run model=qwen2_5_coder_0_5b data=cmqa data.budget_tokens=3072 objective=$objective seed=$seed \
      sparsity=[0.2,0.3] eval=none threads=2 logger=csv progress=false hydra.run.dir=$OUT/cmqa_${objective}_seed$seed
  done
done
dense=true  # the dense model is the same in every run: evaluated once
for seed in $SEEDS; do
  for objective in ppl margin; do
    python -m gisp.evaluate run_dir=$OUT/cmqa_${objective}_seed$seed "${EVAL[@]}" dense=$dense
    dense=false
  done
done
args=()
for seed in $SEEDS; do args+=("$OUT/cmqa_ppl_seed$seed=CMQA + ppl" "$OUT/cmqa_margin_seed$seed=CMQA + margin"); done
QWEN_DEFAULT=${QWEN_DEFAULT:-outputs/qwen_default}
if [ -f "$QWEN_DEFAULT/results.json" ]; then
  python -m gisp.evaluate run_dir=$QWEN_DEFAULT "${EVAL[@]}" dense=false
  args+=("$QWEN_DEFAULT=Austen + ppl (seed 0)")
fi
python experiments/collect.py "${args[@]}" --pivot cmqa_mean --percent
python experiments/collect.py "${args[@]}" --pivot wikitext2_ppl
