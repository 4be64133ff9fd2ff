"""A trajectory computed with compact scoring (prune.compact=true, the default) against the masked dense model
(prune.compact=false), measured alternately in one process: wall time to the target, the masks of every step, and
(each mode in a process of its own) peak memory.

    python experiments/benchmarks/compact_scoring.py                                  # SmolLM2-135M, to 50%
    python experiments/benchmarks/compact_scoring.py --model qwen2_5_coder_0_5b       # Qwen2.5-Coder-0.5B (local parts)
    python experiments/benchmarks/compact_scoring.py --random-shape llama2_7b --layers 32 --device cuda   # a GPU

Each trajectory is `python -m gisp.run` as a library call with the run's defaults (its calibration recipe and
schedule) and `eval=none` (evaluation is compact_eval.py's), on a fresh store, so every step is computed; the modes
alternate masked / compact `--repeats` times and the medians are reported (wall time, and the process's CPU time,
which another job on the machine disturbs less). `--random-shape llama2_7b`: random
weights of Llama-2-7B's shapes (hidden 4096, 32 heads, MLP 11008, vocab 32000, `--layers` layers) written once as a
Hugging Face folder and run as `model=hf`. Extra overrides go after `--`, e.g. `-- data.n_samples=64`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "max_position_embeddings": 4096}


def random_folder(out: Path, layers: int, dtype: str) -> Path:
    """A Llama-2-7B-shaped model with random weights (normal 0.02, norms 1) saved as a Hugging Face folder."""
    import transformers

    if (out / "config.json").is_file():
        return out
    config = transformers.AutoConfig.for_model("llama", num_hidden_layers=layers, **LLAMA2_7B)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    model.model.rotary_emb.__init__(model.config)  # to_empty left the rotary frequencies uninitialized
    model.save_pretrained(out)
    from gisp.models.byte_tokenizer import byte_level_tokenizer

    byte_level_tokenizer().save_pretrained(out)
    return out


def overrides(args, store: Path, compact: bool) -> list[str]:
    model = [f"model={args.model}"] if not args.random_shape else \
        ["model=hf", f"model.path={args.folder}", f"model.dtype={args.dtype}"]
    device = ["trainer.accelerator=gpu", "trainer.devices=1"] if args.device == "cuda" else []
    return [*model, *device, f"sparsity=[{args.target}]", "eval=none", "logger=none", "progress=false",
            f"threads={args.threads}", f"store_dir={store}", f"prune.compact={str(compact).lower()}", *args.extra]


def trajectory(args, compact: bool, work: Path) -> dict:
    """One trajectory to the target on a fresh store: wall time, the steps' records and masks."""
    from gisp.cli import compose_config
    from gisp.config import load_settings
    from gisp.pipeline import run
    from gisp.runs import RunDir

    run_dir = Path(tempfile.mkdtemp(dir=work))
    settings = load_settings(compose_config("config", overrides(args, run_dir / "store", compact)))
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu = time.perf_counter(), time.process_time()
    run(settings, run_dir=run_dir / "run")
    if args.device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    traj = RunDir(run_dir / "run").trajectory
    return {"wall": wall, "cpu": cpu, "scoring": sum(s["seconds"] for s in traj.steps), "steps": traj.steps,
            "masks": [traj.masks_at(s["step"]) for s in traj.steps],
            "peak_cuda": torch.cuda.max_memory_allocated() if args.device == "cuda" else None}


def peak_memory(args, compact: bool) -> int:
    """Peak resident memory (bytes) of a fresh process computing one trajectory in this mode."""
    argv = [sys.executable, __file__, "--one", "compact" if compact else "masked", *sys.argv[1:]]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--random-shape", choices=["llama2_7b"])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of --random-shape")
    parser.add_argument("--dtype", default="bfloat16", help="weights of --random-shape")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-memory", action="store_true", help="skip the per-mode peak memory processes")
    parser.add_argument("--one", choices=["masked", "compact"], help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="more gisp.run overrides (after --)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="gisp_compact_scoring_"))
    args.folder = random_folder(work.parent / f"gisp_random_{args.random_shape}_{args.layers}", args.layers,
                                args.dtype) if args.random_shape else None
    if args.one:  # a child measuring one mode's peak memory
        result = trajectory(args, args.one == "compact", work)
        print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          "peak_cuda": result["peak_cuda"]}))
        return
    name = f"{args.random_shape} shapes, {args.layers} layers" if args.random_shape else args.model
    print(f"{name} on {args.device}, {args.threads} threads, trajectory to {args.target:g} (extra overrides "
          f"{args.extra})", flush=True)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.repeats):
        for compact in (False, True):
            runs[compact].append(trajectory(args, compact, work))
            r = runs[compact][-1]
            print(f"  {'compact' if compact else 'masked '}: {r['wall']:.1f} s wall ({r['cpu']:.1f} s CPU), "
                  f"{r['scoring']:.1f} s in {len(r['steps'])} scoring steps", flush=True)
    masked, compact = runs[False][0], runs[True][0]
    equal = [a.equal(b) for a, b in zip(masked["masks"], compact["masks"])]
    loss = max(abs(a["calib_loss"] - b["calib_loss"]) / abs(a["calib_loss"])
               for a, b in zip(masked["steps"], compact["steps"]))
    per_step = [(b["seconds"] / a["seconds"]) for a, b in zip(masked["steps"], compact["steps"])]
    med = {c: statistics.median(r["wall"] for r in runs[c]) for c in (False, True)}
    scoring = {c: statistics.median(r["scoring"] for r in runs[c]) for c in (False, True)}
    cpu = {c: statistics.median(r["cpu"] for r in runs[c]) for c in (False, True)}
    print(f"trajectory to {args.target:g}: masked {med[False]:.1f} s, compact {med[True]:.1f} s wall, compact / masked "
          f"= {med[True] / med[False]:.3f} (scoring steps alone {scoring[False]:.1f} s vs {scoring[True]:.1f} s, "
          f"{scoring[True] / scoring[False]:.3f}; CPU time {cpu[True] / cpu[False]:.3f})")
    print(f"masks equal at {sum(equal)} of {len(equal)} steps (same step count: "
          f"{len(masked['steps']) == len(compact['steps'])}); calibration loss largest relative difference "
          f"{loss:.1e}; per-step time compact / masked: {', '.join(f'{r:.2f}' for r in per_step)}")
    if args.device == "cuda":
        print(f"peak CUDA memory: masked {masked['peak_cuda'] / 2**30:.2f} GiB, compact "
              f"{compact['peak_cuda'] / 2**30:.2f} GiB")
    if not args.no_memory:
        peaks = {c: peak_memory(args, c) for c in (False, True)}
        print(f"peak resident memory of a process computing the trajectory: masked {peaks[False] / 2**30:.2f} GiB, "
              f"compact {peaks[True] / 2**30:.2f} GiB ({peaks[True] / peaks[False]:.3f})")


if __name__ == "__main__":
    main()
