"""Entry point: `python -m gisp.recover run_dir=RUN sparsity=[0.3,0.5] recover=lora|distill|nested`
(conf/recovery.yaml). Thin: Hydra in, gisp.recovery.runner's `recover_run` out."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gisp.cli import evaluation_overrides, plain_config, run_command, same_command, user_errors
from gisp.config import levels_setting
from gisp.errors import GispError
from gisp.eval.report import levels_text
from gisp.eval.suite import eval_task_specs
from gisp.loggers import Loggers
from gisp.recovery.fit import rank_zero
from gisp.recovery.runner import recover_run
from gisp.recovery.settings import recover_settings


def stop_message(signal_name: str) -> str:
    return (f"stopped by {signal_name}: every level recovered so far is stored, and a fit in progress keeps its last "
            f"checkpoint (one validation interval, recover.val_every steps, at most is lost). Resume with the same "
            f"command:\n  {same_command()}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="recovery")
@user_errors(stop_message=stop_message, resumable=False)
def main(cfg: DictConfig) -> None:
    c = plain_config(cfg)
    settings = recover_settings(c.get("recover"))
    trainer = dict(c.get("trainer") or {})
    if trainer.get("strategy") == "gisp_fsdp":
        # Recovery trains one process's whole student; FSDP training (sharded LoRA / weights and their optimizer) is
        # not built yet, so refuse it here rather than inside Lightning after the model loaded.
        raise GispError("gisp.recover does not train under trainer=fsdp yet: use trainer=ddp (every process holds the "
                        "model; the training memory plan says whether it fits), or one GPU with more memory")
    if c.get("threads"):
        torch.set_num_threads(int(c["threads"]))
    levels = levels_setting(c, old="targets")
    tasks = eval_task_specs(c.get("eval")) if c.get("eval") is not None else None
    with Loggers(c.get("logger"), c) as loggers:
        results = recover_run(c["run_dir"], settings, list(levels) if levels is not None else None, tasks,
                              trainer=trainer, loggers=loggers, progress=bool(c["progress"]),
                              data_dir=c.get("data_dir"), cache_dir=c.get("cache_dir"),
                              trust_remote_code=bool(c.get("trust_remote_code")), hint=evaluation_overrides(),
                              reconstruct=c.get("reconstruct"))
    if results is not None and rank_zero():
        print(f"gisp: results in {Path(c['run_dir']) / 'results.json'}\n{levels_text(results)}")


if __name__ == "__main__":
    run_command(main)
