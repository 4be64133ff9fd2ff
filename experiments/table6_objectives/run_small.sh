#!/usr/bin/env bash
# Table 6 (objective x calibration), small CPU variant on SmolLM2-135M: the same token budget (8,192 tokens) for
# WikiText-2 + perplexity, CMQA + perplexity and CMQA + margin; prune to 20/30/40%, then evaluate the saved
# trajectories on the held-out CMQA parts with lm-eval (deploy many: no second pruning). Plus CMQA + margin with
# 4x the budget at 30%. About 75 minutes on 2 CPU cores.
set -euo pipefail
OUT=${OUT:-outputs/table6}
LIMIT=${LIMIT:-100}     # lm-eval items per task (the paper: all)
COMMON=(sparsity=[0.2,0.3,0.4] eval=wikitext2 threads=2 logger=csv)
EVAL=(eval=cmqa eval.tasks.cmqa.limit=$LIMIT threads=2 logger=csv)

python -m gisp.run "${COMMON[@]}" data=wikitext2 data.n_samples=64 data.seq_len=128 objective=ppl \
    hydra.run.dir=$OUT/wikitext2_ppl
python -m gisp.run "${COMMON[@]}" data=cmqa data.budget_tokens=8192 objective=ppl hydra.run.dir=$OUT/cmqa_ppl
python -m gisp.run "${COMMON[@]}" data=cmqa data.budget_tokens=8192 objective=margin hydra.run.dir=$OUT/cmqa_margin
python -m gisp.run sparsity=0.3 eval=none threads=2 logger=csv data=cmqa data.budget_tokens=32768 objective=margin \
    hydra.run.dir=$OUT/cmqa_margin_32k

python -m gisp.evaluate run_dir=$OUT/wikitext2_ppl "${EVAL[@]}"
for run in cmqa_ppl cmqa_margin cmqa_margin_32k; do
    python -m gisp.evaluate run_dir=$OUT/$run "${EVAL[@]}" dense=false
done
python experiments/collect.py $OUT/wikitext2_ppl="WikiText-2 + ppl" $OUT/cmqa_ppl="CMQA + ppl" \
    $OUT/cmqa_margin="CMQA + margin" $OUT/cmqa_margin_32k="CMQA + margin (32K)" --pivot cmqa_mean --percent
