"""Evaluation of a run's levels as their compact models (compact_eval=true, the default) against the masked dense
model (compact_eval=false), measured alternately in one process.

    python experiments/benchmarks/compact_eval.py RUN_DIR [--levels 0.3 0.5] [--repeats 3] [--threads 2]
                                                          [--device cpu|cuda]

For each level: the wall time of the run's own evaluation (its eval tasks, e.g. WikiText-2 at ctx 128 and 2048) on
the masked dense model and on the compact model (its build included), alternating masked / compact `repeats` times
(the median of each is reported), the metrics of both and their largest relative difference, and the memory the
compact model adds (its parameters; on CUDA also the peak allocated memory of each evaluation).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from gisp.data.sources import resolve_data_dir
    from gisp.eval.suite import build_evaluator, eval_task_specs
    from gisp.runs import RunDir

    run = RunDir(Path(args.run_dir))
    live = run.load_model()
    live.model.to(args.device)
    data_dir = resolve_data_dir(run.config.get("data_dir"))
    evaluator = build_evaluator(eval_task_specs(run.config["eval"]), live.tokenizer, data_dir,
                                work_dir=run.path / "eval_data")
    cuda = args.device.startswith("cuda")
    print(f"{run.model_spec().name} on {args.device}, {args.threads} threads; tasks "
          f"{[t.name for t in eval_task_specs(run.config['eval'])]}")
    for target in args.levels:
        level = run.level(target=target, live=live)
        times: dict[bool, list[float]] = {False: [], True: []}
        peaks: dict[bool, int] = {}
        metrics: dict[bool, dict] = {}
        for _ in range(args.repeats):
            for compact in (False, True):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                with live.at(level, compact=compact) as model:
                    metrics[compact] = evaluator(model, progress=False)
                    if compact:  # the sliced tensors; embeddings and norms are shared with the dense model
                        shared = {p.data_ptr() for p in live.model.parameters()}
                        added = sum(p.numel() * p.element_size() for p in model.parameters()
                                    if p.data_ptr() not in shared)
                if cuda:
                    torch.cuda.synchronize()
                    peaks[compact] = torch.cuda.max_memory_allocated()
                times[compact].append(time.perf_counter() - start)
        masked_s, compact_s = (statistics.median(times[c]) for c in (False, True))
        diff = max(abs(metrics[True][k] - v) / abs(v) for k, v in metrics[False].items())
        dense_bytes = sum(p.numel() * p.element_size() for p in live.model.parameters())
        print(f"level {target:g} (sparsity {level.sparsity:.4f}): masked {masked_s:.2f} s, compact {compact_s:.2f} s, "
              f"compact / masked = {compact_s / masked_s:.3f}; metrics masked {metrics[False]}, compact "
              f"{metrics[True]}, largest relative difference {diff:.2e}; the compact model adds "
              f"{added / 2**20:.0f} MiB ({added / dense_bytes:.2f} of the dense model)"
              + (f"; peak CUDA memory masked {peaks[False] / 2**30:.2f} GiB, compact {peaks[True] / 2**30:.2f} GiB"
                 if cuda else ""))


if __name__ == "__main__":
    main()
