"""Run lm-evaluation-harness tasks on the live (possibly masked) model: no save, no reload.

lm-eval's ``HFLM`` accepts a model instance, so the forward pre-hooks that apply the pruning masks stay in place
and every sparsity level of a trajectory is evaluated on the same weights in memory.

This is the one module of gisp that imports ``lm_eval`` (always inside functions: importing it is slow). Everything
else reaches lm-eval through the small functions here: its version, its installed task YAMLs and YAML loader, its
prompt machinery (:func:`task_renderer`), its task index (:func:`task_index`) and :func:`evaluate_tasks`.
It imports nothing of gisp but :mod:`gisp.errors`, so :mod:`gisp.data.multiple_choice` may use it (lazily) to render
calibration prompts exactly as lm-eval renders them without depending on the rest of the evaluation layer.
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
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


def lm_eval_version() -> str | None:
    """The installed lm-eval version (for results' provenance), None when it is not installed."""
    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def installed_task_yaml(relative: str | Path) -> Path:
    """lm-eval's installed task YAML at ``relative`` to ``lm_eval/tasks`` (e.g. ``"gsm8k/gsm8k.yaml"``)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent / relative


def load_task_yaml(path: str | Path, resolve_func: bool = True) -> dict:
    """A task YAML as lm-eval reads it: ``include`` merged and, with ``resolve_func``, ``!function`` resolved."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=resolve_func)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text clean-up (``lm_eval.tasks.hellaswag.utils.preprocess``)."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    return preprocess(text)


def task_renderer(config: dict, docs: list[dict]):
    """lm-eval's ``ConfigurableTask`` for ``config`` over in-memory ``docs`` (no download): the prompt machinery."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    ds = datasets.Dataset.from_list(docs)
    cfg = {k: v for k, v in config.items() if k not in ("tag", "group", "task_list", "include")}
    splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split")} - {None}
    cfg.update(dataset_kwargs=None, custom_dataset=lambda **_: datasets.DatasetDict({s: ds for s in splits}))
    task_logger = logging.getLogger("lm_eval.api.task")  # silence its "custom kwargs ... --metadata" CLI hint
    level = task_logger.level
    task_logger.setLevel(logging.ERROR)
    try:
        return ConfigurableTask(config=cfg)
    finally:
        task_logger.setLevel(level)


@functools.cache
def _bare_task_manager():
    """A TaskManager that does not index lm-eval's ~10k built-in tasks (about 9 s per call): enough for tasks
    given as config dicts or Task objects."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(include_path: str | Path | None = None, include_defaults: bool = True):
    """lm-eval's ``TaskManager`` over the task YAMLs under ``include_path`` and, with ``include_defaults``, its
    built-in tasks (indexing those takes ~9 s, so managers are cached per process)."""
    return _task_manager(None if include_path is None else str(Path(include_path).expanduser().resolve()),
                         bool(include_defaults))


@dataclass(frozen=True)
class IndexedTask:
    """One name of lm-eval's task index: a task, a group (its ``task:`` list) or a tag (the tasks that carry it)."""

    name: str
    kind: str  # "task" | "python_task" | "group" | "tag"
    config: dict | None  # the YAML as indexed: includes merged, !function not resolved
    yaml_path: Path | None
    members: tuple = ()  # group: its task list entries (names or dicts); tag: its task names


def task_index(include_path: str | Path | None = None, include_defaults: bool = False) -> dict[str, IndexedTask]:
    """The names lm-eval knows under ``include_path`` (and its built-ins with ``include_defaults``)."""
    from lm_eval.tasks._index import Kind

    kinds = {Kind.TASK: "task", Kind.PY_TASK: "python_task", Kind.GROUP: "group", Kind.TAG: "tag"}
    out = {}
    for name, entry in task_manager(include_path, include_defaults).task_index.items():
        kind = kinds.get(entry.kind, "unknown")
        cfg = dict(entry.cfg) if entry.cfg is not None else None
        if kind == "group":
            members = (cfg or {}).get("task") or ()
            members = tuple(members) if isinstance(members, list) else (members,)
        elif kind == "tag":
            members = tuple(sorted(entry.tags))
        else:
            members = ()
        out[name] = IndexedTask(name, kind, cfg, entry.yaml_path, members)
    return out


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
    include_path: str | Path | None = None,
    include_defaults: bool | None = None,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """lm-eval ``simple_evaluate`` on ``tasks`` (names, config dicts or Task objects).

    Task names are looked up in the YAMLs under ``include_path`` (then lm-eval's built-ins only if
    ``include_defaults``, default False) or, without ``include_path``, in lm-eval's built-in tasks.

    Returns ``(results, n_samples)``: {task: {"acc,none": value, ...}} and {task: {"original": n, "effective": n}}.

    The model's train/eval mode is restored afterwards (HFLM switches it to eval).
    """
    from lm_eval import simple_evaluate

    if include_path is not None:
        manager = task_manager(include_path, bool(include_defaults))
    elif any(isinstance(t, str) for t in tasks):  # lm-eval's own task names need its full index
        manager = task_manager(None, True)
    else:
        manager = _bare_task_manager()
    was_training = model.training
    try:
        with _tqdm_disabled(not progress):
            out = simple_evaluate(
                model=make_lm(model, tokenizer, batch_size, max_length),
                tasks=tasks,
                task_manager=manager,
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


@contextmanager
def compiled_templates():
    """lm-eval compiles a task's jinja prompt template again for every document it renders (`env.from_string` in
    `lm_eval.utils.apply_template`): rendering the 14,000 calibration questions spent 25 s compiling the same dozen
    templates. Inside this block each template string is compiled once; jinja templates are immutable, so rendering
    is unchanged (the rendering tests compare with lm-eval's own tasks). lm-eval is left as it was on exit."""
    from lm_eval import utils

    env = utils.env
    if "from_string" in vars(env):  # inside another such block already
        yield
        return
    compile_once = functools.lru_cache(maxsize=256)(env.from_string)

    def from_string(source, globals=None, template_class=None):
        if globals is None and template_class is None and isinstance(source, str):
            return compile_once(source)
        return type(env).from_string(env, source, globals, template_class)

    env.from_string = from_string
    try:
        yield
    finally:
        del env.from_string  # the Environment's own method again
