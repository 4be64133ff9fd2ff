"""GISP vs random structured pruning at the targets of a finished run, on more WikiText-2 windows.

    python experiments/pipeline_smollm2/compare_random.py RUN_DIR [--windows 256] [--seeds 2]

Rebuilds the run's model, restores each target's masks on the dense weights (no pruning again), draws random
structures of the unprotected layers to the same sparsity, evaluates both on the first WINDOWS non-overlapping
128-token windows of WikiText-2 (raw test) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from gisp.data.sources import resolve_data_dir
from gisp.eval.suite import build_evaluator, eval_task_spec
from gisp.prune.methods import random_cut
from gisp.runs import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--windows", type=int, default=256, help="evaluation windows (None = all)")
    parser.add_argument("--seeds", type=int, default=2, help="random baselines per target")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    run = RunDir(args.run_dir)
    live = run.load_model()
    model, structure, applier = live.model, live.structure, live.applier
    results = run.results()
    ppl = dict(run.config["eval"]["tasks"]["wikitext2_ppl"], max_windows=args.windows)
    evaluator = build_evaluator([eval_task_spec("wikitext2_ppl", ppl)], live.tokenizer,
                                resolve_data_dir(run.config.get("data_dir")))
    info = evaluator.describe()["wikitext2_ppl"]
    started = time.perf_counter()

    live.set_level(None)
    dense = evaluator(model)["wikitext2_ppl"]
    rows = [f"| dense | 0 | {dense:.2f} | - |"]
    for key, entry in results["targets"].items():
        live.set_level(run.level(target=float(key)))
        gisp = evaluator(model)["wikitext2_ppl"]
        randoms = []
        for seed in range(args.seeds):
            applier.set(random_cut(structure, float(key), seed=seed).masks)
            randoms.append(evaluator(model)["wikitext2_ppl"])
        rows.append(f"| {key} | {entry['sparsity']:.4f} | {gisp:.2f} | {statistics.mean(randoms):.1f} "
                    f"(seeds: {', '.join(f'{r:.1f}' for r in randoms)}) |")
    print(f"WikiText-2 raw test, {info['n_windows']} non-overlapping windows x {info['seq_len']} tokens "
          f"({info['n_tokens']} of {info['stream_tokens']} tokens), {args.threads} threads, "
          f"{time.perf_counter() - started:.0f} s\n")
    print("| target | measured sparsity | GISP ppl | random ppl (mean) |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
