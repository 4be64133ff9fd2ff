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

from gisp.builders import build_evaluator, load_run_model
from gisp.data.sources import resolve_data_dir
from gisp.io import read_json
from gisp.prune.masks import MaskApplier, Masks
from gisp.prune.methods import random_plan
from gisp.models.families import family_spec
from gisp.models.structure import describe, layer_modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--windows", type=int, default=256, help="evaluation windows (None = all)")
    parser.add_argument("--seeds", type=int, default=2, help="random baselines per target")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg, model, tok = load_run_model(args.run_dir)
    cfg.eval.tasks.wikitext2_ppl.max_windows = args.windows
    results = read_json(args.run_dir / "results.json")
    structure = describe(model, explicit=results["method"]["protected_layers"])
    applier = MaskApplier(layer_modules(model, family_spec(model.config.model_type)), structure)
    evaluator = build_evaluator(cfg.eval, tok, resolve_data_dir(cfg.get("data_dir")))
    info = evaluator.describe()["wikitext2_ppl"]
    started = time.perf_counter()

    applier.set(Masks.dense(structure))
    dense = evaluator(model)["wikitext2_ppl"]
    rows = [f"| dense | 0 | {dense:.2f} | - |"]
    for key, entry in results["targets"].items():
        applier.set(Masks.load(args.run_dir / entry["masks"]))
        gisp = evaluator(model)["wikitext2_ppl"]
        randoms = []
        for seed in range(args.seeds):
            applier.set(random_plan(structure, float(key), seed=seed).masks)
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
