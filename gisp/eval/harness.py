"""Run lm-evaluation-harness tasks on the live (possibly masked) model: no save, no reload.

lm-eval's ``HFLM`` accepts a model instance, so the forward pre-hooks that apply the pruning masks stay in place
and every sparsity level of a trajectory is evaluated on the same weights in memory.
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager
from typing import Any

import torch

from gisp.errors import GispError

log = logging.getLogger(__name__)


def make_lm(model: torch.nn.Module, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """An lm-eval ``HFLM`` around the live model; ``tokenizer`` is required (lm-eval would try the hub)."""
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise GispError("lm-eval needs the model's tokenizer; none was given")
    if tokenizer.eos_token_id is None:
        raise GispError(
            "the tokenizer has no eos_token: lm-eval needs one (end of generation, padding of requests); set "
            "tokenizer.eos_token or use the model's own tokenizer"
        )
    kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
    if max_length is not None:
        kwargs["max_length"] = max_length
    return HFLM(**kwargs)


@functools.cache
def _bare_task_manager():
    """A TaskManager that does not index lm-eval's ~10k built-in tasks (about 9 s per call): enough for tasks
    given as config dicts or Task objects."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


@contextmanager
def _tqdm_disabled(disabled: bool):
    """lm-eval draws its own tqdm bars; tqdm honours TQDM_DISABLE."""
    old = os.environ.get("TQDM_DISABLE")
    if disabled:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if disabled:
            if old is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = old


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: list,
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 1234,
    progress: bool = True,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """lm-eval ``simple_evaluate`` on ``tasks`` (names, config dicts or Task objects).

    Returns ``(results, n_samples)``: {task: {"acc,none": value, ...}} and {task: {"original": n, "effective": n}}.

    The model's train/eval mode is restored afterwards (HFLM switches it to eval).
    """
    from lm_eval import simple_evaluate

    by_name = any(isinstance(t, str) for t in tasks)  # lm-eval's own task names need its full index
    was_training = model.training
    try:
        with _tqdm_disabled(not progress):
            out = simple_evaluate(
                model=make_lm(model, tokenizer, batch_size, max_length),
                tasks=tasks,
                task_manager=None if by_name else _bare_task_manager(),
                num_fewshot=num_fewshot,
                limit=limit,
                log_samples=False,
                bootstrap_iters=1000,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    finally:
        model.train(was_training)
    if out is None:  # lm-eval returns None on non-zero ranks
        return {}, {}
    results = {name: dict(metrics) for name, metrics in out["results"].items()}
    return results, {name: dict(n) for name, n in (out.get("n-samples") or {}).items()}
