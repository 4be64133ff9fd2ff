"""Deploy many: evaluate any sparsity level of a saved trajectory on the live masked model, without pruning again.

    python -m gisp.evaluate run_dir=DIR targets=[0.2,0.3,0.4,0.5] eval=[wikitext2,cmqa]

Any sparsity the run's trajectory reaches is a level: its masks are read out exactly (no scoring pass), written under
RUN_DIR/levels/ and applied to the model in memory; the metrics are merged into the run's results.json (rewritten
atomically after every level, so an interrupted evaluation keeps what it finished), logged as a wandb table, and
drawn in RUN_DIR/metrics.png.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from gisp.cli import hydra_output_dir, same_command, user_errors
from gisp.config import build_loggers, eval_tasks, finalize_loggers, parse_targets, plain
from gisp.data.sources import resolve_data_dir
from gisp.errors import GispError
from gisp.eval.protocols import mark_mixed
from gisp.eval.report import levels_text, log_results_table, plot_results
from gisp.eval.suite import EvalTaskSpec, build_evaluator, build_suites
from gisp.io import write_json_atomic
from gisp.pipeline import save_level
from gisp.prune.trajectory import target_key
from gisp.recover.artefacts import Recovery, load_recovered
from gisp.recover.runner import evaluate_recovered
from gisp.runs import RunDir, check_protocols, claim, needs_evaluation, record_metrics

log = logging.getLogger("gisp")


def evaluate_run(run_dir: str | Path, tasks: tuple[EvalTaskSpec, ...] | list[EvalTaskSpec],
                 targets: list[float] | tuple[float, ...] | None = None, dense: bool = True,
                 data_dir: Path | None = None, cache_dir: str | Path | None = None,
                 progress: bool = True, split_seed: int | None = None, loggers: list | None = None,
                 trust_remote_code: bool = False, recovered: str | None = None) -> dict[str, Any]:
    """Evaluate the dense model and ``targets`` (default: the run's targets) of a run dir; returns results.json.
    ``recovered``: evaluate those targets as the recovery of that name left them (gisp.recover) instead."""
    run = RunDir(run_dir)
    with claim(run.path):
        results = run.results()
        # a re-evaluation that was stopped half-way (mixed_protocols) is continued by running it again
        if results is None or not (results.get("complete", True) or results.get("mixed_protocols")):
            raise GispError(f"no complete {run.results_path}: the run did not finish; finish it first with gisp.run "
                            f"(the same command with hydra.run.dir={run.path} resumes it)")
        if not tasks:
            raise GispError("nothing to evaluate: the eval config has no tasks (choose eval=wikitext2, eval=cmqa, ...)")
        if recovered is not None:
            Recovery(run.path, recovered).require()
            done = [k for k, e in results.get("targets", {}).items() if recovered in (e.get("recovered") or {})]
            targets = sorted(float(k) for k in done) if targets is None else targets
            missing = [t for t in targets if target_key(t) not in done]
            if missing:
                raise GispError(f"the recovery {recovered!r} of {run.path} has not recovered levels {missing} (it has "
                                f"{sorted(done, key=float)}): recover them first with gisp.recover")
        targets = sorted(float(k) for k in results.get("targets", {})) if targets is None else targets
        reach = run.trajectory.reached
        beyond = [t for t in targets if t > reach]
        if beyond:
            raise GispError(f"sparsity {beyond} is not a level of this trajectory: it reaches {reach:.4f} "
                            f"({run.trajectory.directory}); extend it with gisp.run (sparsity=[...,{max(beyond)}])")
        run_split_seed = run.config.get("split_seed")
        if split_seed is not None and run_split_seed is not None and split_seed != run_split_seed:
            raise GispError(f"split_seed={split_seed} differs from the run's split_seed={run_split_seed}: the local "
                            f"evaluation half could overlap the calibration half; use split_seed={run_split_seed}")
        data_dir = resolve_data_dir(data_dir if data_dir is not None else run.config.get("data_dir"))
        for target in targets:  # every level's masks checked against the trajectory before anything is evaluated
            run.level(target=target, masks_only=True)
        suites = build_suites(tasks, data_dir, work_dir=run.path / "eval_data")  # refused before loading, if at all
        live = run.load_model(cache_dir, trust_remote_code=trust_remote_code)
        evaluator = build_evaluator(tasks, live.tokenizer, data_dir, work_dir=run.path / "eval_data",
                                    max_positions=getattr(live.model.config, "max_position_embeddings", None),
                                    suites=suites)
        if recovered is not None:
            return _evaluate_recovered(run, results, recovered, targets, live, evaluator, progress, loggers)
        descriptions = evaluator.describe()
        plan = ([None] if dense else []) + list(targets)
        check_protocols(results, descriptions, ["dense" if t is None else target_key(t) for t in plan], run.path)
        for target in plan:
            level = run.level(target=target, live=live) if target is not None else None
            label = "dense" if level is None else target_key(target)
            if level is None:
                entry = results["dense"]
            else:
                entry = results["targets"].setdefault(label, {**level.record(), "added_by": "gisp.evaluate"})
                entry["masks"] = save_level(run.path, label, level)
            if not needs_evaluation(entry, descriptions):
                log.info("%s: already evaluated with these settings", label)
                continue
            live.set_level(level)
            log.info("evaluating %s", label)
            metrics = evaluator(live.model, progress=progress)
            log.info("%s: %s", label, metrics)
            descriptions = evaluator.describe()  # items evaluated are known now
            record_metrics(results, entry, metrics, descriptions, evaluator.metric_tasks)
            write_json_atomic(run.results_path, results)
            for logger in loggers or []:
                logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=level.step if level else 0)
        return _finish(run, results, live, loggers)


def _evaluate_recovered(run: RunDir, results: dict, name: str, targets: list[float], live, evaluator, progress: bool,
                        loggers: list | None) -> dict[str, Any]:
    levels = {target_key(t): run.level(target=t, live=live) for t in targets}

    def model_of(key: str):
        model = load_recovered(run.path, name, live, levels[key])
        if model is live.model:  # nested: the recovered dense weights under the level's masks
            live.set_level(levels[key])
        return model

    def write() -> None:
        mark_mixed(results)
        write_json_atomic(run.results_path, results)

    evaluate_recovered(results, name, list(levels), model_of, evaluator, run.path, progress, write)
    return _finish(run, results, live, loggers)


def _finish(run: RunDir, results: dict, live, loggers: list | None) -> dict[str, Any]:
    """The end of an evaluation: complete again once every level is measured with one protocol per task (else it
    stays marked mixed), written, the masks removed, the figure and the loggers' table updated."""
    if not mark_mixed(results):
        results["complete"] = True
    write_json_atomic(run.results_path, results)
    live.applier.remove()
    plot_results(results, run.path / "metrics.png")
    log_results_table(loggers or [], results)
    return results


def stop_message(signal_name: str) -> str:
    return (f"stopped by {signal_name}: the levels evaluated so far are in the run's results.json (while levels of "
            "two evaluation protocols are mixed it is marked incomplete and says which); run the same command to "
            f"evaluate the rest:\n  {same_command()}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@user_errors(stop_message=stop_message, resumable=False)
def main(cfg: DictConfig) -> None:
    # run_dir is checked by gisp.cli.OutputDirCheck before Hydra makes the log folder inside it
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    targets = parse_targets(cfg.targets) if cfg.targets is not None else None
    tasks = eval_tasks(cfg.eval)
    loggers = build_loggers(plain(cfg.logger), hydra_output_dir(), plain(cfg))
    status = "failed"
    try:
        results = evaluate_run(cfg.run_dir, tasks, targets, dense=cfg.dense, data_dir=cfg.get("data_dir"),
                               cache_dir=cfg.get("cache_dir"), progress=cfg.progress, split_seed=cfg.split_seed,
                               loggers=loggers, trust_remote_code=bool(cfg.get("trust_remote_code")),
                               recovered=cfg.get("recovered"))
        status = "success"
    finally:
        finalize_loggers(loggers, status)
    print(f"gisp: results in {Path(cfg.run_dir) / 'results.json'}\n{levels_text(results)}")


if __name__ == "__main__":
    main()
