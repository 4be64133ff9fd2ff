#!/usr/bin/env bash
# The measurements of experiments/recovery_smollm2.md, from the repo root on 2 CPU cores (~4 h in all):
#   bash experiments/recovery_smollm2/run.sh
# Everything lands in one run dir ($RUN): the default SmolLM2 run, its recoveries under recovered/<name>/, every
# metric (pruned and recovered, same protocols) in its results.json.
set -euo pipefail
RUN=${RUN:-outputs/smollm2_135m/recovery}
T=${THREADS:-2}
export WANDB_MODE=${WANDB_MODE:-offline}

# 0. the cost of a recovery step against a bare forward + backward of the same student (one process, alternating)
python experiments/benchmarks/recovery_step.py outputs/smollm2_135m/recovery_base --target 0.5 --threads "$T" \
  | tee experiments/recovery_smollm2/benchmark_0.5.md || true

# 1. the default run (prune once: 20-50%, WikiText-2 at ctx 128 and 2048) and CMQA of the dense model and 30 / 50%
python -m gisp.run hydra.run.dir="$RUN" threads="$T" logger=csv progress=false
python -m gisp.evaluate run_dir="$RUN" 'targets=[0.3,0.5]' eval=cmqa eval.tasks.cmqa.limit=100 logger=none \
  threads="$T" progress=false

# 2. recoveries of 30% and 50% on WikiText-2 valid (in domain, disjoint from the test split evaluated), lr 1e-3:
#    200k tokens per level for lora / distill, 400k for nested (both levels: equal total tokens), curves on the way
COMMON=(run_dir="$RUN" 'targets=[0.3,0.5]' +data@recover.data=wikitext2 recover.lr=1e-3 threads="$T" progress=false)
python -m gisp.recover "${COMMON[@]}" recover=lora recover.name=lora recover.tokens=200000 \
  'recover.eval_at=[25000,50000,100000]'
python -m gisp.recover "${COMMON[@]}" recover=distill recover.name=distill recover.tokens=200000 \
  'recover.eval_at=[25000,50000,100000]'
python -m gisp.recover "${COMMON[@]}" recover=nested recover.name=nested recover.tokens=400000 \
  'recover.eval_at=[50000,100000,200000]'
# 3. the run's own calibration text (Austen, out of domain) for LoRA at 50%
python -m gisp.recover run_dir="$RUN" 'targets=[0.5]' recover=lora recover.name=lora_austen recover.lr=1e-3 \
  recover.tokens=200000 'recover.eval_at=[25000,50000,100000]' threads="$T" progress=false

# 4. CMQA of every recovered level (the pruned levels' protocol)
for name in lora distill nested lora_austen; do
  python -m gisp.evaluate run_dir="$RUN" recovered=$name eval=cmqa eval.tasks.cmqa.limit=100 logger=none \
    threads="$T" progress=false
done

# 5. the tables of experiments/recovery_smollm2.md
python experiments/collect.py "$RUN" --metrics wikitext2_ppl wikitext2_ppl_2048 cmqa_mean
