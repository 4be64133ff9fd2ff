#!/usr/bin/env bash
# Table 2 (one-shot vs iterative GISP), small CPU variant on SmolLM2-135M. The same two runs are part of the
# Table 4 sweep (experiments/table4_methods/run_small.sh writes outputs/table4/{gisp,oneshot}); this script runs
# only those two, with the same settings, and prints the comparison.
set -euo pipefail
OUT=${OUT:-outputs/table4}
OUT=$OUT PRUNERS=gisp,oneshot bash "$(dirname "$0")/../table4_methods/run_small.sh"
python experiments/collect.py $OUT/gisp="GISP iterative (20 steps)" $OUT/oneshot="GISP one-shot" \
    --pivot wikitext2_ppl
