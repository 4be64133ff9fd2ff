"""Does an exported level compute what the masked model computes, loaded without gisp? One check on a real model.

    python experiments/benchmarks/export_matches.py RUN_DIR TARGET EXPORT_DIR [--tokens 64] [--threads 2]

Loads the run's model with gisp and the level's masks, takes the logits of a WikiText-2 test window; then, in a
fresh Python process that never imports gisp, loads EXPORT_DIR with `trust_remote_code=True` and takes the same
logits. Prints the parameter counts, the largest absolute logit difference (relative to the largest logit) and
whether greedy continuations of 16 tokens agree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("target")
    parser.add_argument("export_dir")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default="~/.cache/gisp")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from gisp.data.sources import resolve_data_dir
    from gisp.models.families import family_spec
    from gisp.models.loading import load_model_and_tokenizer
    from gisp.models.structure import describe, layer_modules
    from gisp.prune.masks import MaskApplier, Masks
    from gisp.runs import RunDir

    run = RunDir(Path(args.run_dir))
    spec = run.model_spec()
    model, tok = load_model_and_tokenizer(spec, Path(args.cache_dir).expanduser())
    level = run.results()["targets"][args.target]
    MaskApplier(layer_modules(model, family_spec(model.config.model_type)), describe(model)).set(
        Masks.load(run.path / level["masks"]))
    text = (resolve_data_dir(None) / "wikitext-2" / "test.txt").read_text()[:4000]
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    with torch.no_grad():
        logits = model(ids).logits
        greedy = model.generate(ids[:, :16], max_new_tokens=16, do_sample=False)
    dense_params = sum(p.numel() for p in model.parameters())
    export_dir = str(Path(args.export_dir).resolve())  # the fresh process runs in a temporary folder
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"ids": ids, "logits": logits, "greedy": greedy}, Path(tmp) / "expected.pt")
        script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads({args.threads})
m = AutoModelForCausalLM.from_pretrained({export_dir!r}, trust_remote_code=True, dtype=torch.float32).eval()
d = torch.load({str(Path(tmp) / 'expected.pt')!r}, weights_only=True)
with torch.no_grad():
    diff = (m(d["ids"]).logits - d["logits"]).abs().max().item()
    greedy = m.generate(d["ids"][:, :16], max_new_tokens=16, do_sample=False)
assert not any(name.startswith("gisp") for name in sys.modules)
print(json.dumps({{"max_abs_diff": diff, "largest_logit": d["logits"].abs().max().item(),
                  "greedy_equal": bool(torch.equal(greedy, d["greedy"])),
                  "params": sum(p.numel() for p in m.parameters())}}))
"""
        # cwd: a folder without gisp, so the fresh process cannot import it from the checkout
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, cwd=tmp)
        if proc.returncode != 0:
            raise SystemExit(f"the export did not load or run without gisp:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{spec.name} level {args.target} (sparsity {level['sparsity']:.4f}): export {out['params']:,} "
          f"parameters vs dense {dense_params:,} ({out['params'] / dense_params:.3f}x)")
    print(f"max |logit difference| {out['max_abs_diff']:.3g} (largest logit {out['largest_logit']:.3g}, relative "
          f"{out['max_abs_diff'] / out['largest_logit']:.2g}) over {ids.shape[1]} tokens; greedy 16 tokens equal: "
          f"{out['greedy_equal']}")


if __name__ == "__main__":
    main()
