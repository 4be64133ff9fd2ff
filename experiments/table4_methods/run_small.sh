#!/usr/bin/env bash
# Tables 2 and 4, small CPU variant on SmolLM2-135M: seven methods on the same calibration set (WikiText-2,
# 32 x 128 = 4,096 tokens), the same protected layers and the same parameter-sparsity targets, evaluated by the same
# WikiText-2 perplexity (raw test, non-overlapping windows: 64 x 128 tokens at ctx 128, 2 x 2048 at ctx 2048).
# GISP: 20-step linear schedule to 70% of structures (19 scoring passes reach 50%). One Hydra multirun; each
# method's run dir is $OUT/<method>. About 40 minutes on 2 CPU cores; split the pruner list over two shells
# (PRUNERS=..., THREADS=1) to use both cores.
set -euo pipefail
OUT=${OUT:-outputs/table4}
PRUNERS=${PRUNERS:-gisp,oneshot,llm_pruner,wanda_sp,flap,magnitude,random}
THREADS=${THREADS:-2}

python -m gisp.run -m pruner=$PRUNERS sparsity=[0.2,0.3,0.4,0.5] \
    data=wikitext2 data.n_samples=32 data.seq_len=128 schedule.steps=20 \
    eval.tasks.wikitext2_ppl.max_windows=64 eval.tasks.wikitext2_ppl_2048.max_windows=2 \
    threads=$THREADS logger=csv hydra.sweep.dir=$OUT 'hydra.sweep.subdir=${pruner.name}'

python experiments/collect.py $OUT/gisp=GISP $OUT/oneshot="GISP one-shot" $OUT/llm_pruner=LLM-Pruner \
    $OUT/wanda_sp=Wanda-sp $OUT/flap=FLAP $OUT/magnitude=Magnitude $OUT/random=Random --pivot wikitext2_ppl
