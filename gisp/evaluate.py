"""Entry point: deploy many, evaluate any sparsity level of a saved trajectory without pruning again. Thin: Hydra in,
gisp.deploy's `evaluate_run` out.

    python -m gisp.evaluate run_dir=DIR sparsity=[0.2,0.3,0.4,0.5] eval=[wikitext2,cmqa]

The metrics are merged into the run's results.json (after every level), logged as a wandb table and drawn in
RUN_DIR/metrics.png.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gisp.cli import evaluation_overrides, plain_config, reconstruct_overrides, run_command, same_command, user_errors
from gisp.config import check_bool, levels_setting
from gisp.deploy import evaluate_run
from gisp.eval.report import levels_text
from gisp.eval.suite import eval_task_specs
from gisp.loggers import Loggers


def stop_message(signal_name: str) -> str:
    return (f"stopped by {signal_name}: the levels evaluated so far are in the run's results.json (while levels of "
            "two evaluation protocols are mixed it is marked incomplete and says which); run the same command to "
            f"evaluate the rest:\n  {same_command()}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@user_errors(stop_message=stop_message, resumable=False)
def main(cfg: DictConfig) -> None:
    c = plain_config(cfg)  # run_dir was checked by gisp.cli.Preflight before Hydra made its log folder inside it
    if c.get("threads"):
        torch.set_num_threads(int(c["threads"]))
    levels = levels_setting(c, old="targets")
    tasks = eval_task_specs(c["eval"]) if c.get("eval") is not None else None  # None: the run's own settings
    compact = check_bool(c.get("compact_eval", True), "compact_eval")
    with Loggers(c.get("logger"), c) as loggers:
        results = evaluate_run(c["run_dir"], tasks, levels, dense=c["dense"], data_dir=c.get("data_dir"),
                               cache_dir=c.get("cache_dir"), progress=c["progress"], split_seed=c.get("split_seed"),
                               loggers=loggers, trust_remote_code=bool(c.get("trust_remote_code")),
                               recovered=c.get("recovered"), hint=evaluation_overrides(),
                               reconstruct=c.get("reconstruct"), reconstruct_overrides=reconstruct_overrides(),
                               compact=compact)
    print(f"gisp: results in {Path(c['run_dir']) / 'results.json'}\n{levels_text(results)}")


if __name__ == "__main__":
    run_command(main)
