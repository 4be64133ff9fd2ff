#!/usr/bin/env bash
# Table 7 (GSM8K, calibration data matters), small CPU variant on SmolLM2-135M: prune to 20% with WikiText-2 + ppl
# and with GSM8K + answer-token loss (64 train pairs, about the same token budget), then score both trajectories with lm-eval's 8-shot
# GSM8K exact match on LIMIT test questions. SmolLM2-135M solves none of them dense (0/8 recorded), so this is a
# plumbing check, not a reproduction; about 25 minutes on 2 CPU cores.
set -euo pipefail
OUT=${OUT:-outputs/table7}
LIMIT=${LIMIT:-8}
COMMON=(sparsity=[0.2] eval=none threads=2 logger=csv)

python -m gisp.run "${COMMON[@]}" data=wikitext2 data.n_samples=64 data.seq_len=128 objective=ppl \
    hydra.run.dir=$OUT/wikitext2_ppl
python -m gisp.run "${COMMON[@]}" data=gsm8k data.n_samples=64 objective=answer_ppl hydra.run.dir=$OUT/gsm8k_answer_ppl
python -m gisp.evaluate run_dir=$OUT/wikitext2_ppl eval=gsm8k eval.tasks.gsm8k.limit=$LIMIT threads=2 logger=csv
python -m gisp.evaluate run_dir=$OUT/gsm8k_answer_ppl eval=gsm8k eval.tasks.gsm8k.limit=$LIMIT threads=2 \
    logger=csv dense=false
python experiments/collect.py $OUT/wikitext2_ppl="WikiText-2 + ppl" $OUT/gsm8k_answer_ppl="GSM8K + answer loss" \
    --pivot gsm8k_exact_match_flexible --percent
