"""The one level loop: evaluate each level of a run (pruned, recovered, ...) that lacks metrics of the current
evaluation protocols, and record them in results.json after each level.

gisp.run (the levels it just read out), gisp.evaluate (saved levels, deploy many) and gisp.recover (recovered levels)
all go through `evaluate_levels`; what differs is how a level becomes a model, which each `LevelJob` says with its
`model()` context (masks on the dense model, a recovered compact model, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from torch import nn

from gisp.memory.reconstruction import plan_table
from gisp.prune.levels import Level
from gisp.reconstruct.levels import Reconstructor
from gisp.results import Results
from gisp.runs import LiveModel

log = logging.getLogger(__name__)


@dataclass
class LevelJob:
    """One level to evaluate: its key in results.json, its record there (updated in place), the level as a model for
    as long as it is evaluated, and the step loggers file its metrics under (the trajectory step it is cut from)."""

    key: str
    entry: dict
    model: Callable[[], AbstractContextManager[nn.Module]]
    step: int = 0


@contextmanager
def as_is(model: nn.Module) -> Iterator[nn.Module]:
    """A model that needs no setting up."""
    yield model


def pruned_level(live: LiveModel, level: Level, entry: dict, reconstructor: Reconstructor | None = None,
                 compact: bool = False) -> Callable[[], AbstractContextManager[nn.Module]]:
    """A pruned level as a model, for a LevelJob: with the run's reconstruction (computed, or reused from the store,
    only when the level is evaluated; its record goes into the level's entry), on the dense model under its masks or
    as its compact model (`compact`; a reconstructed level always is one)."""

    @contextmanager
    def model() -> Iterator[nn.Module]:
        made = level
        if reconstructor is not None and reconstructor.enabled:
            made = reconstructor.level(level)
            entry["reconstruction"] = made.reconstruction
        with live.at(made, compact=compact) as m:
            yield m

    return model


def record_reconstruction(results: Results, reconstructor: Reconstructor, overrides: list[str]) -> None:
    """Check the command's reconstruction against the one the run dir's levels hold (one per run dir; `overrides`:
    the gisp.run overrides that make a run dir of the new one) and record it with its memory plan."""
    definition = reconstructor.definition()
    results.check_reconstruction(definition, overrides)
    plan = reconstructor.plan()
    if plan is not None:
        log.info("%s", plan_table(plan))
    results.record_reconstruction(definition, plan)


def reconstruction_context(reconstructor: Reconstructor | None) -> dict:
    """What a recovery of reconstructed levels adds to its definition (it starts from the reconstructed weights);
    nothing without a reconstruction, so that earlier recoveries keep their ids."""
    if reconstructor is None or not reconstructor.enabled:
        return {}
    return {"reconstruction": reconstructor.definition()}


def evaluate_levels(results: Results, jobs: list[LevelJob], evaluator, *, specs=(), progress: bool = True,
                    loggers: list | tuple = (), computed: dict[str, dict[str, float]] | None = None,
                    hint: list[str] | None = None) -> None:
    """Evaluate the jobs whose records lack metrics of the evaluator's current protocols; results.json is written after
    each level (an interrupted loop keeps what it finished). `computed`: perplexities a level already has from a
    multi-process pass (only its suites run here). `hint`: the command's evaluation overrides, for the refusal that
    names how to re-evaluate when protocols would mix. `specs`: the evaluation tasks (gisp.eval.suite.EvalTaskSpec),
    recorded as the run's current settings. Without an evaluator the records are written as they are."""
    if evaluator is None:
        results.write()
        return
    descriptions = evaluator.describe()
    results.check_protocols(descriptions, [job.key for job in jobs], hint)
    for job in jobs:
        if not results.needs_evaluation(job.entry, descriptions):
            log.info("%s: already evaluated with these settings", job.key)
            job.entry.setdefault("metrics", {})
            continue
        log.info("evaluating %s", job.key)
        with job.model() as model:
            if job.key in (computed or {}):
                metrics = evaluator.merge(computed[job.key], evaluator.suite_metrics(model, progress=progress))
            else:
                metrics = evaluator(model, progress=progress)
        descriptions = evaluator.describe()  # items evaluated are known now
        results.record_metrics(job.entry, metrics, descriptions, evaluator.metric_tasks)
        results.write()
        log.info("evaluation at %s: %s", job.key, metrics)
        for logger in loggers:
            logger.log_metrics({f"eval/{m}": v for m, v in metrics.items()}, step=job.step)
    results.record_eval_settings(specs)
    results.write()
