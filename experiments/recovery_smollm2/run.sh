#!/usr/bin/env bash
# The measurements of experiments/recovery_smollm2.md, from the repo root on 2 CPU cores (~80 min with the default
# budget; TOKENS=250000 gives the longer curve, ~3 h):
#   bash experiments/recovery_smollm2/run.sh
# Everything lands in one run dir ($RUN): the default SmolLM2 run, its recoveries under recovered/<name>/, every
# metric (pruned and recovered, same protocols) in its results.json.
set -euo pipefail
RUN=${RUN:-outputs/smollm2_135m/recovery}
T=${THREADS:-2}
TOKENS=${TOKENS:-100000}          # per level for lora / distill; nested gets 2 x TOKENS for its two levels
PY=${PY:-python}
export WANDB_MODE=${WANDB_MODE:-offline}

# 1. the default run (prune once: 20-50%, WikiText-2 at ctx 128 and 2048)
$PY -m gisp.run hydra.run.dir="$RUN" threads="$T" logger=csv progress=false

# 0. the cost of a recovery step against a bare forward + backward of the same student (one process, alternating)
$PY experiments/benchmarks/recovery_step.py "$RUN" --target 0.5 --threads "$T" \
  | tee experiments/recovery_smollm2/benchmark_0.5.md

# 2. recoveries of 30% and 50% on WikiText-2 valid (in domain, disjoint from the test split evaluated), the same
#    hyperparameters for all three (LoRA r 16 / alpha 32 on q,k,v,o,gate,up,down, lr 2e-3, batch 4 x 256 tokens),
#    TOKENS per level for lora / distill and 2 x TOKENS for nested (both levels: equal total tokens), curves on the way
COMMON=(run_dir="$RUN" 'targets=[0.3,0.5]' +data@recover.data=wikitext2 recover.lr=2e-3 recover.batch_size=4
        threads="$T" progress=false)
$PY -m gisp.recover "${COMMON[@]}" recover=lora recover.name=lora recover.tokens="$TOKENS" \
  "recover.eval_at=[$((TOKENS / 4)),$((TOKENS / 2))]"
$PY -m gisp.recover "${COMMON[@]}" recover=distill recover.name=distill recover.tokens="$TOKENS" \
  "recover.eval_at=[$((TOKENS / 4)),$((TOKENS / 2))]"
$PY -m gisp.recover "${COMMON[@]}" recover=nested recover.name=nested recover.tokens=$((2 * TOKENS)) \
  "recover.eval_at=[$((TOKENS / 2)),$TOKENS]"

# 3. CMQA (100 items per task) of 30% and 50%, pruned and recovered (the same protocol)
$PY -m gisp.evaluate run_dir="$RUN" 'targets=[0.3,0.5]' eval=cmqa eval.tasks.cmqa.limit=100 logger=none \
  threads="$T" progress=false
for name in lora distill nested; do
  $PY -m gisp.evaluate run_dir="$RUN" recovered=$name eval=cmqa eval.tasks.cmqa.limit=100 logger=none \
    threads="$T" progress=false
done

# 4. the tables of experiments/recovery_smollm2.md
$PY experiments/collect.py "$RUN" --metrics wikitext2_ppl wikitext2_ppl_2048 cmqa_mean
