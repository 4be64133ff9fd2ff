"""Cost of one recovery step against a bare forward + backward of the same student, measured in one process.

    python experiments/benchmarks/recovery_step.py RUN_DIR [--target 0.5] [--batch 8] [--seq-len 256] [--threads 2]

On a finished run (its model and the level's masks): per mode, seconds per optimizer step (median of --repeats after
a warm-up), tokens/s, the ratio to the bare step timed alternately in the same process (both see the same machine
load), and the peak RSS rise. Modes:
  bare      the level's compact model, every weight trainable, the model's own loss over the full logits (HF style)
  lora      gisp's recover=lora step: the compact student with a LoRA (r 16, dropout 0.05), chunked cross-entropy
  distill   recover=distill: + the dense teacher's forward and the chunked KL
  nested    recover=nested: the dense model with one LoRA under the level's masks, the teacher = adapter off
Each step runs through the same functions as RecoveryModule.training_step (hidden states, chunked head losses).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="*", default=["lora", "distill", "nested"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from gisp.models.families import family_spec
    from gisp.models.structure import layer_modules
    from gisp.prune.masks import MaskApplier, Masks
    from gisp.recovery.losses import head_loss
    from gisp.recovery.settings import LoraSettings
    from gisp.recovery.students import base_model, compact_student, hidden_states, output_head, with_lora
    from gisp.runs import RunDir

    run = RunDir(args.run_dir)
    live = run.load_model()
    live.applier.remove()
    level = run.level(target=args.target, live=live)
    torch.manual_seed(0)
    ids = torch.randint(0, live.model.config.vocab_size, (args.batch, args.seq_len))
    tokens = ids.numel()

    bare_student = compact_student(live.model, level.masks, live.structure, own_weights=True).requires_grad_(True)
    lora_student = with_lora(compact_student(live.model, level.masks, live.structure), LoraSettings())
    lora_student.train()

    def bare() -> None:
        bare_student.zero_grad(set_to_none=True)
        bare_student(ids, labels=ids).loss.backward()

    def lora() -> None:
        loss, n = head_loss(hidden_states(lora_student, ids, None), output_head(lora_student), ids, 128)
        (loss / n).backward()

    def distill() -> None:
        with torch.no_grad():
            teacher = hidden_states(live.model, ids, None)
        loss, n = head_loss(hidden_states(lora_student, ids, None), output_head(lora_student), ids, 128, teacher,
                            output_head(live.model), 2.0, kl_weight=1.0, ce_weight=0.0)
        (loss / n).backward()

    steps = {"lora": lora, "distill": distill}
    if "nested" in args.modes:
        nested_student = with_lora(live.model, LoraSettings())
        nested_student.train()
        applier = MaskApplier(layer_modules(base_model(nested_student), family_spec(live.model.config.model_type)),
                              live.structure)

        def nested() -> None:
            applier.set(Masks.dense(live.structure))
            with torch.no_grad(), nested_student.disable_adapter():
                teacher = hidden_states(nested_student, ids, None)
            applier.set(level.masks)
            loss, n = head_loss(hidden_states(nested_student, ids, None), output_head(nested_student), ids, 128,
                                teacher, output_head(nested_student), 2.0, kl_weight=1.0, ce_weight=0.0)
            (loss / n).backward()

        steps["nested"] = nested

    def timed(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bare()  # warm-up
    print(f"{run.model_spec().name} at {level.sparsity:.4f}, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.threads} threads")
    print("| step | s / step | tokens/s | vs bare (same process, alternating) |")
    print("|---|---|---|---|")
    rows = {}
    for mode in args.modes:
        steps[mode]()  # warm-up
        mine, base = [], []
        for _ in range(args.repeats):
            base.append(timed(bare))
            mine.append(timed(steps[mode]))
        rows[mode] = (statistics.median(mine), statistics.median(base))
    base_all = statistics.median(b for _, b in rows.values())
    print(f"| bare fwd+bwd (all weights, full logits) | {base_all:.2f} | {tokens / base_all:.0f} | 1.00 |")
    for mode, (mine, base) in rows.items():
        print(f"| {mode} | {mine:.2f} | {tokens / mine:.0f} | {mine / base:.2f} |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak RSS {rss / 2**20:.2f} GiB (rise during the steps {max(rss - rss0, 0) / 2**20:.2f} GiB)")


if __name__ == "__main__":
    main()
