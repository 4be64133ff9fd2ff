"""The recovery curves of a run dir as markdown: per level and recovery, the metrics after 0 (the pruned level),
each `recover.eval_at` milestone and the end, with the training tokens, wall time and tokens/s (for a nested
recovery: the tokens, time and speed of the one training of all its levels together).

    python experiments/recovery_smollm2/curves.py RUN_DIR [--metrics wikitext2_ppl wikitext2_ppl_2048]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def fmt(metrics: dict, name: str) -> str:
    value = metrics.get(name)
    if value is None:
        return "-"
    err = metrics.get(f"{name}_stderr")
    return f"{value:.1f}" + (f" +- {err:.1f}" if err is not None else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--metrics", nargs="*", default=["wikitext2_ppl", "wikitext2_ppl_2048"])
    args = parser.parse_args()
    run = Path(args.run_dir)
    results = json.loads((run / "results.json").read_text())
    print(f"| level | recovery | tokens | {' | '.join(args.metrics)} | wall s | tokens/s |")
    print("|---|---|---|" + "---|" * len(args.metrics) + "---|---|")
    for target, level in results["targets"].items():
        recovered = level.get("recovered") or {}
        if not recovered:
            continue
        print(f"| {target} | pruned | 0 | {' | '.join(fmt(level['metrics'], m) for m in args.metrics)} | | |")
        for name, final in recovered.items():
            record_file = run / "recovered" / name / "recovery.json"
            if not record_file.is_file():
                continue
            records = json.loads(record_file.read_text())["levels"]
            # a nested recovery keeps one record for all its levels; its tokens are the total over them
            record = records.get(target) or records.get("nested") or {}
            for point in record.get("curve", []):
                if point.get("level", target) == target:
                    print(f"| {target} | {name} | {point['tokens']:,} | "
                          f"{' | '.join(fmt(point['metrics'], m) for m in args.metrics)} | | |")
            print(f"| {target} | {name} | {record.get('tokens', 0):,} | "
                  f"{' | '.join(fmt(final.get('metrics', {}), m) for m in args.metrics)} | "
                  f"{record.get('seconds', '-')} | {record.get('tokens_per_s', '-')} |")


if __name__ == "__main__":
    main()
