"""Entry point: `python -m gisp.recover run_dir=RUN targets=[0.3,0.5] recover=lora|distill|nested` (conf/recovery.yaml).
Thin: Hydra in, `recover_run(...)` out."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gisp.cli import same_command, user_errors
from gisp.config import build_loggers, eval_tasks, finalize_loggers, parse_targets, plain
from gisp.errors import GispError
from gisp.eval.report import levels_text
from gisp.recover.runner import recover_run
from gisp.recover.settings import recover_settings
from gisp.recover.stage import rank_zero


def stop_message(signal_name: str) -> str:
    return (f"stopped by {signal_name}: every level recovered so far is stored, and a fit in progress keeps its last "
            f"checkpoint (one validation interval, recover.val_every steps, at most is lost). Resume with the same "
            f"command:\n  {same_command()}")


@hydra.main(version_base="1.3", config_path="../../conf", config_name="recovery")
@user_errors(stop_message=stop_message, resumable=False)
def main(cfg: DictConfig) -> None:
    settings = recover_settings(plain(cfg.recover))
    trainer = plain(cfg.trainer) or {}
    if trainer.get("strategy") == "gisp_fsdp":
        # Recovery trains one process's whole student; FSDP training (sharded LoRA / weights and their optimizer) is
        # not built yet, so refuse it here rather than inside Lightning after the model loaded.
        raise GispError("gisp.recover does not train under trainer=fsdp yet: use trainer=ddp (every process holds the "
                        "model; the training memory plan says whether it fits), or one GPU with more memory")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    targets = list(parse_targets(cfg.targets)) if cfg.targets is not None else None
    tasks = eval_tasks(cfg.eval) if cfg.get("eval") is not None else None
    logger_nodes = plain(cfg.logger) or {}
    made: list = []

    def loggers(folder: Path, hyperparameters: dict) -> list:
        out = build_loggers(logger_nodes, folder, {**plain(cfg), **hyperparameters})
        made.extend(out)
        return out

    status = "failed"
    try:
        results = recover_run(cfg.run_dir, settings, targets, tasks, trainer=trainer, loggers=loggers,
                              progress=bool(cfg.progress), data_dir=cfg.get("data_dir"), cache_dir=cfg.get("cache_dir"),
                              trust_remote_code=bool(cfg.get("trust_remote_code")))
        status = "success"
    finally:
        finalize_loggers(made, status)
    if results is not None and rank_zero():
        print(f"gisp: results in {Path(cfg.run_dir) / 'results.json'}\n{levels_text(results)}")


if __name__ == "__main__":
    main()
