#!/usr/bin/env bash
# Table 6 (objective x calibration), small CPU variant on SmolLM2-135M: same token budget (8,192 tokens) for
# WikiText-2 + perplexity and CMQA + margin; prune to 20/30/40%, then evaluate the saved trajectories on the
# held-out CMQA halves with lm-eval (deploy many: no second pruning).
set -euo pipefail
OUT=${OUT:-outputs/table6}
LIMIT=${LIMIT:-100}     # lm-eval items per task (the paper: all)
COMMON=(sparsity=[0.2,0.3,0.4] eval=wikitext2 threads=2 logger=csv)

python -m gisp.run "${COMMON[@]}" data=wikitext2 data.n_samples=64 data.seq_len=128 objective=ppl \
    hydra.run.dir=$OUT/wikitext2_ppl
python -m gisp.run "${COMMON[@]}" data=cmqa data.budget_tokens=8192 objective=margin \
    hydra.run.dir=$OUT/cmqa_margin

python -m gisp.evaluate run_dir=$OUT/wikitext2_ppl eval=cmqa eval.tasks.cmqa.limit=$LIMIT threads=2 logger=csv
python -m gisp.evaluate run_dir=$OUT/cmqa_margin eval=cmqa eval.tasks.cmqa.limit=$LIMIT dense=false threads=2 \
    logger=csv
