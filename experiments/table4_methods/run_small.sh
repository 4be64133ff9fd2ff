#!/usr/bin/env bash
# Tables 2 and 4, small CPU variant on SmolLM2-135M: the recipe is conf/experiment/table4_small.yaml (seven methods,
# one Hydra multirun, each method's run dir is $OUT/<method>). About 40 minutes on 2 CPU cores; split the pruner
# list over two shells (PRUNERS=..., THREADS=1) to use both cores.
set -euo pipefail
OUT=${OUT:-outputs/table4}
PRUNERS=${PRUNERS:-gisp,oneshot,llm_pruner,wanda_sp,flap,magnitude,random}
THREADS=${THREADS:-2}

python -m gisp.run -m experiment=table4_small pruner=$PRUNERS threads=$THREADS hydra.sweep.dir=$OUT

python experiments/collect.py $OUT/gisp=GISP $OUT/oneshot="GISP one-shot" $OUT/llm_pruner=LLM-Pruner \
    $OUT/wanda_sp=Wanda-sp $OUT/flap=FLAP $OUT/magnitude=Magnitude $OUT/random=Random --pivot wikitext2_ppl
