"""What physical pruning buys at inference: size on disk, prefill and decode speed of exported compact models.

    python experiments/benchmarks/export_speed.py RUN_DIR [--targets 0.2 0.3 0.4 0.5] [--threads 2] \
        [--prompt-len 512] [--batches 1 8] [--decode-tokens 32] [--repeats 3] [--out-dir TMP] [--keep]
    python experiments/benchmarks/export_speed.py --random-shapes llama2_7b --device cuda --dtype bfloat16 \
        [--targets 0.2 0.3 0.4 0.5]
    # CPU smoke check of the random-shapes mode:
    python experiments/benchmarks/export_speed.py --random-shapes llama2_7b --layers 2 --device cpu \
        --dtype float32 --prompt-len 64 --batches 1 --decode-tokens 4 --repeats 1
    # llama.cpp (llama-cpp-python, the `llama` extra): GGUF files of the dense model and of each target
    python experiments/benchmarks/export_speed.py RUN_DIR --engine llama.cpp [--gguf-dtype f16] \
        [--flash-attn off on] [--threads 2] [--prompt-len 512] [--decode-tokens 32] [--repeats 3]

Each target's masks (RUN_DIR/results.json, or `random_cut` structures with --random-shapes) are exported with
`export_compact` to a temporary folder and reloaded with `GispDecoderForCausalLM.from_pretrained`; dense is the plain
HF model as loaded, its disk size that of a `save_pretrained` (safetensors, same dtype). Per model: parameters,
safetensors bytes, prefill tokens/s (random ids, no cache, last-position logits as in `generate` unless
--all-logits), decode tokens/s (greedy single-token steps on a KV cache after a --decode-prompt prefill; only the
steps are timed): median of --repeats after one warm-up. On CUDA also peak GPU memory (weights + activations; the
dense model goes back to the CPU for the exports). Progress on stderr, table on stdout.

With --engine llama.cpp every model (dense = all heads and channels) is written as a deci GGUF (gisp.compact.gguf)
and run by llama.cpp through llama-cpp-python at batch 1 with the same threads, with flash attention off and/or on:
prefill = one llama_decode of --prompt-len random tokens, decode = --decode-tokens greedy single-token steps after a
--decode-prompt prefill, the models measured in turn round by round (medians of --repeats rounds after a warm-up
round); plus the file size and the KV cache bytes per token llama.cpp allocates (read from its
log: without flash attention llama.cpp pads every layer's V cache to the widest layer). The run's WikiText-2
perplexity of each level is copied from results.json when it has one.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

SHAPES = {"llama2_7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")] \
        if info.exists() else []
    return names[0] if names else platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, repeats: int, device: torch.device, setup=None) -> float:
    """Median seconds of `fn(state)` over `repeats` runs after one warm-up; `setup()` (untimed) makes the state."""
    times = []
    for i in range(repeats + 1):
        state = setup() if setup else None
        sync(device)
        started = time.perf_counter()
        fn(state)
        sync(device)
        if i:  # run 0 is the warm-up
            times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.no_grad()
def prefill_tps(model, batch: int, args, vocab: int, device: torch.device) -> float:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, args.prompt_len), generator=g).to(device)
    keep = 0 if args.all_logits else 1
    seconds = median_time(lambda _: model(input_ids=ids, use_cache=False, logits_to_keep=keep), args.repeats, device)
    return batch * args.prompt_len / seconds


@torch.no_grad()
def decode_tps(model, batch: int, args, vocab: int, device: torch.device) -> float:
    g = torch.Generator().manual_seed(1000 + batch)
    prompt = torch.randint(0, vocab, (batch, args.decode_prompt), generator=g).to(device)

    def setup():  # untimed: prefill the prompt, keep its cache and the first greedy token
        mask = torch.ones_like(prompt)
        out = model(input_ids=prompt, attention_mask=mask, use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), mask

    def steps(state):
        cache, tok, mask = state
        for _ in range(args.decode_tokens):
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            out = model(input_ids=tok, past_key_values=cache, attention_mask=mask, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    return batch * args.decode_tokens / median_time(steps, args.repeats, device, setup)


@contextmanager
def work_folder(args, prefix: str, what: str):
    """A temporary folder for the exported files: removed at the end unless --keep."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=args.out_dir))
    log(f"temporary folder {work}")
    try:
        yield work
    finally:
        if args.keep:
            log(f"{what} kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure(name: str, model, disk: int, sparsity: float, args, device: torch.device, base_mem: int) -> dict:
    vocab = model.config.vocab_size
    row = {"name": name, "sparsity": sparsity, "params": sum(p.numel() for p in model.parameters()), "bytes": disk}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for b in args.batches:
        log(f"  {name}: prefill and decode at batch {b}")
        row[f"prefill{b}"] = prefill_tps(model, b, args, vocab, device)
        row[f"decode{b}"] = decode_tps(model, b, args, vocab, device)
    if device.type == "cuda":
        row["peak_gb"] = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**30
    return row


def load_dense(args, device: torch.device, dtype: torch.dtype | None):
    """(model, tokenizer, label, {target: masks}); masks are None for random shapes (made from the structure)."""
    from gisp.runs import RunDir

    run = RunDir(args.run_dir)
    live = run.load_model()
    masks = {t: run.level(target=t, live=live).masks for t in args.targets}
    model = live.model.to(device=device, dtype=dtype or live.model.dtype)
    return model, live.tokenizer, f"{run.model_spec().name} from {run.path}", masks


def build_random(args, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = {**SHAPES[args.random_shapes], **({"num_hidden_layers": args.layers} if args.layers else {})}
    with torch.device(device):  # random weights made directly on the device, in the dtype
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype or torch.float32)
    label = (f"{args.random_shapes} shapes ({shape['num_hidden_layers']} layers), random weights and random "
             "structures (random_cut, seed 0): speed depends only on the shapes")
    return model, None, label, None


def print_table(rows: list[dict], args, cuda: bool) -> None:
    speeds = [(kind, b) for kind in ("prefill", "decode") for b in args.batches]
    cols = ["model", "sparsity", "params (M)", "x", "disk (MB)", "x"] + [
        c for kind, b in speeds for c in (f"{kind} b{b} tok/s", "x")] + (["peak GPU GB"] if cuda else [])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    dense = rows[0]
    x = lambda r, key: f"{r[key] / dense[key]:.2f}"  # ratio to dense
    for r in rows:
        cells = [r["name"], f"{r['sparsity']:.3f}", f"{r['params'] / 1e6:.2f}", x(r, "params"),
                 f"{r['bytes'] / 1e6:.1f}", x(r, "bytes")]
        cells += [c for kind, b in speeds for c in (f"{r[f'{kind}{b}']:.1f}", x(r, f"{kind}{b}"))]
        print("| " + " | ".join(cells + ([f"{r['peak_gb']:.2f}"] if cuda else [])) + " |")
    print()
    for r in rows[1:]:
        parts = [f"{kind} speedup at " + ", ".join(f"batch {b}: {r[f'{kind}{b}'] / dense[f'{kind}{b}']:.2f}x"
                                                   for b in args.batches) for kind in ("prefill", "decode")]
        print(f"target {r['name']}: " + "; ".join(parts))


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp: GGUF files of the dense model and of each level, run through llama-cpp-python.

KV_LOG = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells.*K \(\w+\): +([\d.]+) MiB, "
                    r"V \(\w+\): +([\d.]+) MiB")


class CapturedStderr:
    """llama.cpp logs on the C stderr (fd 2): captured into `self.text` for the duration of the block."""

    def __enter__(self):
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode(errors="replace")
        self._file.close()


def open_gguf(path: Path, args, flash_attn: bool, n_ctx: int, verbose: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=args.prompt_len, n_ubatch=args.prompt_len,
                 n_threads=args.threads, n_threads_batch=args.threads, flash_attn=flash_attn, seed=0,
                 verbose=verbose)


def kv_bytes_per_token(path: Path, args, flash_attn: bool) -> float:
    """KV cache bytes per token as llama.cpp allocates them (its log, at a 8192-token context for precision)."""
    with CapturedStderr() as cap:
        open_gguf(path, args, flash_attn, 8192, verbose=True).close()
    m = KV_LOG.search(cap.text)
    if m is None:
        raise RuntimeError("llama.cpp did not log its KV cache size")
    return (float(m.group(3)) + float(m.group(4))) * 2**20 / int(m.group(2))


class LlamaTimer:
    """One model in llama.cpp: a timed prefill and a timed decode, one of each per call (the caller interleaves
    the models round by round, so load from other jobs on a shared machine hits all of them alike)."""

    def __init__(self, path: Path, args, flash_attn: bool, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
        self.args = args
        self.llm = open_gguf(path, args, flash_attn, args.prompt_len + args.decode_tokens + 16)
        self.prefill_s: list[float] = []
        self.decode_s: list[float] = []

    def _next(self) -> int:
        import numpy as np

        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def measure(self, keep: bool) -> None:
        llm, a = self.llm, self.args
        llm.reset()
        started = time.perf_counter()
        llm.eval(self.ids)
        prefill = time.perf_counter() - started
        llm.reset()
        llm.eval(self.ids[: a.decode_prompt])
        token = self._next()
        started = time.perf_counter()
        for _ in range(a.decode_tokens):
            llm.eval([token])
            token = self._next()
        if keep:  # round 0 is the warm-up
            self.prefill_s.append(prefill)
            self.decode_s.append(time.perf_counter() - started)

    def speeds(self) -> tuple[float, float]:
        """(prefill tok/s, decode tok/s): medians over the kept rounds."""
        self.llm.close()
        return (self.args.prompt_len / statistics.median(self.prefill_s),
                self.args.decode_tokens / statistics.median(self.decode_s))


def run_metric(results: dict | None, key: str) -> float | None:
    """The first perplexity-like metric of a target in results.json (None without one)."""
    entry = (results or {}).get("dense" if key == "dense" else "targets", {})
    entry = entry if key == "dense" else entry.get(key, {})
    metrics = entry.get("metrics") or {}
    name = next((m for m in metrics if m.startswith("wikitext2_ppl")), None)
    return metrics.get(name) if name else None


def gguf_rows(model, tokenizer, structure, levels: dict, args, work: Path, results: dict | None) -> list[dict]:
    """One row per model: parameters, file bytes, KV bytes per token and speed with flash attention off / on."""
    from gisp.compact.gguf import export_gguf
    from gisp.prune.masks import Masks, sparsity

    rows, paths = [], []
    for name, (masks, bias) in [("dense", (Masks.dense(structure), None)), *levels.items()]:
        path = work / f"{name}.gguf"
        log(f"writing {path}")
        summary = export_gguf(model, tokenizer, masks, path, args.gguf_dtype, structure, bias)
        rows.append({"name": name, "sparsity": sparsity(masks, structure), "params": summary["parameters"],
                     "bytes": summary["bytes"], "ppl": run_metric(results, name)})
        paths.append(path)
    for fa in args.flash_attn:
        on = fa == "on"
        for row, path in zip(rows, paths):
            row[f"kv_{fa}"] = kv_bytes_per_token(path, args, on)
        timers = [LlamaTimer(path, args, on, model.config.vocab_size) for path in paths]
        for r in range(args.repeats + 1):
            log(f"  llama.cpp, flash attention {fa}: round {r} of {args.repeats} (0 = warm-up), all models")
            for timer in timers:
                timer.measure(keep=r > 0)
        for row, timer in zip(rows, timers):
            row[f"prefill_{fa}"], row[f"decode_{fa}"] = timer.speeds()
    return rows


def print_gguf_table(rows: list[dict], args) -> None:
    cols = ["model", "sparsity", "WikiText-2 ppl", "params (M)", "file (MB)", "x"]
    for fa in args.flash_attn:
        cols += [f"KV B/token FA {fa}", f"prefill tok/s FA {fa}", "x", f"decode tok/s FA {fa}", "x"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    dense = rows[0]
    for r in rows:
        cells = [r["name"], f"{r['sparsity']:.3f}", "-" if r["ppl"] is None else f"{r['ppl']:.2f}",
                 f"{r['params'] / 1e6:.2f}", f"{r['bytes'] / 1e6:.1f}", f"{r['bytes'] / dense['bytes']:.2f}"]
        for fa in args.flash_attn:
            cells += [f"{r[f'kv_{fa}']:.0f}", f"{r[f'prefill_{fa}']:.1f}",
                      f"{r[f'prefill_{fa}'] / dense[f'prefill_{fa}']:.2f}", f"{r[f'decode_{fa}']:.1f}",
                      f"{r[f'decode_{fa}'] / dense[f'decode_{fa}']:.2f}"]
        print("| " + " | ".join(cells) + " |")


def main_llama_cpp(args) -> None:
    import llama_cpp

    from gisp.runs import RunDir

    run = RunDir(args.run_dir)
    live = run.load_model()
    levels = {}
    for t in args.targets:
        level = run.level(target=t, live=live)
        levels[f"{t:g}"] = (level.masks, level.bias)
    structure = live.structure
    header = (f"{run.model_spec().name} from {run.path} (prune.gqa_mode={structure.gqa_mode}), GGUF {args.gguf_dtype} "
              f"(deci), llama-cpp-python {llama_cpp.__version__}, CPU {cpu_name()}, {args.threads} threads, batch 1; "
              f"prefill {args.prompt_len} tokens in one batch, decode {args.decode_tokens} tokens after a "
              f"{args.decode_prompt}-token prompt; median of {args.repeats} after 1 warm-up; KV cache f16")
    with work_folder(args, "gisp_gguf_speed_", "GGUF files") as work:
        rows = gguf_rows(live.model, live.tokenizer, structure, levels, args, work, run.results())
    print(header + "\n")
    print_gguf_table(rows, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", help="a finished gisp run dir (config.yaml, results.json)")
    parser.add_argument("--random-shapes", choices=sorted(SHAPES), help="random weights of these shapes, no run dir")
    parser.add_argument("--layers", type=int, help="with --random-shapes: override the layer count (smoke checks)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 (default: the run's, float32 for random)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode-prompt", type=int, default=64, help="prompt length before the timed decode steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--all-logits", action="store_true", help="prefill computes logits of every position")
    parser.add_argument("--out-dir", help="where the temporary export folder goes (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the exported folders")
    parser.add_argument("--engine", choices=["torch", "llama.cpp"], default="torch")
    parser.add_argument("--gguf-dtype", default="f16", choices=["f32", "f16", "q8_0"], help="with --engine llama.cpp")
    parser.add_argument("--flash-attn", nargs="+", default=["off", "on"], choices=["off", "on"],
                        help="with --engine llama.cpp")
    args = parser.parse_args()
    if (args.run_dir is None) == (args.random_shapes is None):
        parser.error("give either RUN_DIR or --random-shapes")
    if args.layers and not args.random_shapes:
        parser.error("--layers only applies to --random-shapes")
    torch.set_num_threads(args.threads)  # before any model work
    if args.engine == "llama.cpp":
        if args.run_dir is None:
            parser.error("--engine llama.cpp needs a RUN_DIR")
        return main_llama_cpp(args)

    from gisp.compact import GispDecoderForCausalLM
    from gisp.export import export_compact
    from gisp.models.structure import describe
    from gisp.prune.masks import sparsity
    from gisp.prune.methods import random_cut

    device, cuda = torch.device(args.device), args.device.startswith("cuda")
    log(f"loading the dense model on {device}")
    load = build_random if args.random_shapes else load_dense
    model, tokenizer, label, masks = load(args, device, getattr(torch, args.dtype) if args.dtype else None)
    model.eval()
    dtype = next(model.parameters()).dtype
    structure = describe(model)
    if masks is None:
        masks = {t: random_cut(structure, t, seed=0).masks for t in args.targets}
    gpu = f" ({torch.cuda.get_device_name(device)})" if cuda else ""
    header = (f"{label}. torch {torch.__version__}, device {device}{gpu}, dtype {str(dtype).removeprefix('torch.')}, "
              f"{torch.get_num_threads()} threads, CPU {cpu_name()}; prefill {args.prompt_len} tokens "
              f"({'all' if args.all_logits else 'last-position'} logits), decode {args.decode_tokens} tokens after a "
              f"{args.decode_prompt}-token prompt; median of {args.repeats} after 1 warm-up")

    rows = []
    with work_folder(args, "gisp_export_speed_", "exported folders") as work:
        log("saving the dense model (for its size on disk)")
        model.save_pretrained(work / "dense", safe_serialization=True)
        dense_bytes = folder_bytes(work / "dense")
        if not args.keep:
            shutil.rmtree(work / "dense")
        log("measuring dense")
        rows.append(measure("dense", model, dense_bytes, 0.0, args, device, 0))
        model.cpu()  # frees the device for the compact models (the export itself works on any device)
        for t in args.targets:
            out = work / f"sparsity_{t:g}"
            log(f"exporting target {t:g} to {out}")
            export_compact(model, tokenizer, masks[t], out, provenance={"benchmark": "export_speed"},
                           structure=structure)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            base_mem = torch.cuda.memory_allocated(device) if cuda else 0
            compact = GispDecoderForCausalLM.from_pretrained(out, dtype=dtype).to(device).eval()
            log(f"measuring target {t:g}")
            rows.append(measure(f"{t:g}", compact, folder_bytes(out), sparsity(masks[t], structure), args, device,
                                base_mem))
            del compact
            gc.collect()
            if not args.keep:
                shutil.rmtree(out)
    print(header + "\n")
    print_table(rows, args, cuda)


if __name__ == "__main__":
    main()
