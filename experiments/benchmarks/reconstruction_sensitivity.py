"""How the least-squares reconstruction's settings change a run's levels: perplexity and time per variant.

    python experiments/benchmarks/reconstruction_sensitivity.py RUN_DIR --levels 0.2 0.5 \
        --variants '{"target": "dense", "damp": 0.1, "tokens": 4096}' '{"damp": 0.01, "tokens": 8192}' [--threads 2]

Each variant is a set of `reconstruct.*` settings over `method=lsq` and the defaults (gisp.reconstruct.settings),
drawn from the run's calibration recipe as a run would. For each level: the plain (masked) level's metrics on the
run's evaluation, then each variant's, with the seconds its reconstruction took. Nothing is written to the run dir or
the store: this measures, it does not record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.5])
    parser.add_argument("--variants", nargs="+", default=['{}'], help="JSON objects of reconstruct settings")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from gisp.data.recipes import recipe_from_fields
    from gisp.data.sources import resolve_data_dir
    from gisp.eval.suite import build_evaluator, eval_task_specs
    from gisp.reconstruct.build import reconstruct, reconstruction_batches
    from gisp.reconstruct.settings import ReconstructSettings
    from gisp.runs import RunDir

    run = RunDir(Path(args.run_dir))
    live = run.load_model()
    data_dir = resolve_data_dir(run.config.get("data_dir"))
    evaluator = build_evaluator(eval_task_specs(run.config["eval"]), live.tokenizer, data_dir,
                                work_dir=run.path / "eval_data")
    recipe = recipe_from_fields(run.config["data"])
    variants = [json.loads(v) for v in args.variants]
    for target in args.levels:
        level = run.level(target=target, live=live)
        with live.at(level) as model:
            print(f"level {target:g}: plain {evaluator(model, progress=False)}", flush=True)
        for variant in variants:
            settings = ReconstructSettings(**{"method": "lsq", "seed": int(run.config.get("seed", 0)), **variant})
            batches, _ = reconstruction_batches(recipe, live.tokenizer, data_dir, settings, "cpu")
            start = time.perf_counter()
            rec = reconstruct(live.model, live.layers, live.structure, level.masks, batches, settings)
            seconds = time.perf_counter() - start
            made = dataclasses.replace(level, bias=rec.bias, weights=rec.weights or None)
            with live.at(made) as model:
                print(f"  {variant}: {evaluator(model, progress=False)} ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
