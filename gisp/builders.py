"""Config nodes -> typed objects: the one place (with gisp.pipeline.run) that reads Hydra/OmegaConf config.

Each builder validates its node and raises GispError naming the field and the fix, before expensive work starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gisp.data.calibration import CalibrationSet, from_pairs, from_questions, from_windows
from gisp.data.sources import TextSource, calibration_windows, load_text
from gisp.errors import GispError
from gisp.eval.suite import Evaluator, PerplexityTask
from gisp.models.loading import ModelSpec, load_model_and_tokenizer
from gisp.prune.objectives import Objective, check_supported

log = logging.getLogger(__name__)

DATA_KINDS = ("text", "gsm8k", "multiple_choice")
EVAL_KINDS = ("perplexity", "multiple_choice", "gsm8k")


def _fields(node: DictConfig | dict) -> dict[str, Any]:
    return dict(OmegaConf.to_container(node, resolve=True)) if OmegaConf.is_config(node) else dict(node)


def text_source(node: DictConfig) -> TextSource:
    fields = _fields(node)
    fields["local_files"] = tuple(fields.get("local_files") or ())
    try:
        return TextSource(**fields)
    except TypeError as e:
        raise GispError(f"bad text source config {fields}: {e}") from None


def model_spec(node: DictConfig) -> ModelSpec:
    try:
        return ModelSpec(**_fields(node))
    except TypeError as e:
        raise GispError(f"bad model config: {e}; see conf/model/*.yaml for the fields") from None


def load_run_model(run_dir: str | Path, cache_dir: str | Path | None = None):
    """(resolved config, model, tokenizer) of a run dir, from the config.yaml every run writes: for export,
    evaluation and benchmarks of a finished run without pruning again."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise GispError(f"no {path}: is {run_dir} a gisp run dir?")
    cfg = OmegaConf.load(path)
    model, tokenizer = load_model_and_tokenizer(model_spec(cfg.model), Path(cache_dir or cfg.cache_dir).expanduser())
    return cfg, model, tokenizer


def _construct(cls, name: str, fields: dict[str, Any], **extra):
    try:
        return cls(**fields, **extra)
    except TypeError as e:
        raise GispError(f"eval task {name!r}: {e}; see conf/eval/*.yaml for the fields") from None


def build_evaluator(eval_cfg: DictConfig, tokenizer, data_dir: Path | None, work_dir: Path | None = None,
                    max_positions: int | None = None) -> Evaluator | None:
    """The evaluation suite of `eval.tasks`: perplexities (kind perplexity), lm-eval multiple-choice tasks and
    GSM8K. Local data are checked and prepared here, once, so every sparsity level is scored on the same items."""
    ppl_tasks, suites = [], {}
    for name, node in (eval_cfg.get("tasks") or {}).items():
        fields = _fields(node)
        kind = fields.pop("kind", "perplexity")
        if kind == "perplexity":
            ppl_tasks.append(PerplexityTask(metric=name, source=text_source(node.text), seq_len=fields["seq_len"],
                                            max_windows=fields.get("max_windows"), batch_size=fields["batch_size"],
                                            variant=fields.get("variant", "")))
        elif kind == "multiple_choice":
            from gisp.eval.multiple_choice import MultipleChoiceSuite

            fields["tasks"] = tuple(fields.get("tasks") or ())
            suites[name] = _construct(MultipleChoiceSuite, name, fields, data_dir=data_dir,
                                      work_dir=(work_dir / name) if work_dir else None)
        elif kind == "gsm8k":
            from gisp.data.gsm8k import GSM8KTask

            suites[name] = _construct(GSM8KTask, name, fields, data_dir=data_dir,
                                      work_dir=(work_dir / name) if work_dir else None)
        else:
            raise GispError(f"eval task {name!r}: unknown kind {kind!r}; use one of {EVAL_KINDS}")
    if not ppl_tasks and not suites:
        return None
    return Evaluator(ppl_tasks, tokenizer, data_dir, suites=suites, max_positions=max_positions)


def pad_id_of(tokenizer) -> int:
    """Padding is masked out (attention 0, label -100), so any valid id works; prefer the tokenizer's own."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def build_calibration(data_cfg: DictConfig, objective: Objective, tokenizer, data_dir: Path | None) -> CalibrationSet:
    """The calibration set of `data` for `objective` (text windows, GSM8K pairs or multiple-choice questions)."""
    kind = data_cfg.get("kind", "text")
    record = {"batch_size": data_cfg.batch_size, "seed": data_cfg.seed, "objective": objective.name}
    if kind == "text":
        text, prov = load_text(text_source(data_cfg.text), data_dir)
        windows = calibration_windows(text, tokenizer, data_cfg.n_samples, data_cfg.seq_len, data_cfg.seed)
        return from_windows(windows, objective, record=prov | record | {"seq_len": data_cfg.seq_len})
    if kind == "gsm8k":
        from gisp.data.gsm8k import calibration_pairs, load_gsm8k

        docs, prov = load_gsm8k("calibration", data_dir, source=data_cfg.source)
        pairs = calibration_pairs(docs, data_cfg.n_samples, data_cfg.seed)
        return from_pairs(pairs, tokenizer, objective, data_cfg.cap_percentile, pad_id=pad_id_of(tokenizer),
                          record=prov | record)
    if kind == "multiple_choice":
        from gisp.data.multiple_choice import load_questions

        questions, provenance = {}, {}
        for task in data_cfg.tasks:
            questions[task], provenance[task] = load_questions(task, "calibration", data_dir, source=data_cfg.source,
                                                               split_seed=data_cfg.split_seed)
        calib = from_questions(questions, tokenizer, objective, data_cfg.budget_tokens, data_cfg.cap_percentile,
                               data_cfg.seed, pad_id=pad_id_of(tokenizer), record=record)
        for task, prov in provenance.items():
            calib.record["tasks"][task]["data"] = prov
        return calib
    raise GispError(f"data.kind {kind!r} is unknown; use one of {DATA_KINDS} (see conf/data/*.yaml)")


def build_loggers(logger_cfg: DictConfig | None, run_dir: Path, cfg: DictConfig) -> list:
    loggers = []
    for name, node in (logger_cfg or {}).items():
        logger = instantiate(node, save_dir=str(run_dir))
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        loggers.append(logger)
        log.info("logging to %s (%s)", name, type(logger).__name__)
    return loggers


def check_split_seeds(cfg: DictConfig) -> None:
    """Offline multiple-choice data with one labelled split are halved by a seeded permutation: calibration and
    evaluation must use the same seed, or the halves could overlap (calibrating on what is evaluated)."""
    if cfg.data.get("kind") != "multiple_choice":
        return
    for name, node in (cfg.eval.get("tasks") or {}).items():
        if node.get("kind") == "multiple_choice" and node.get("split_seed") != cfg.data.split_seed:
            raise GispError(
                f"data.split_seed={cfg.data.split_seed} differs from eval.tasks.{name}.split_seed={node.split_seed}: "
                "the calibration and evaluation halves of the local data would overlap; set split_seed=... once "
                "(both default to it)"
            )


def check_objective_data(objective: Objective, data_cfg: DictConfig) -> None:
    """Refuse an objective the calibration data cannot express, before loading anything."""
    check_supported(objective, data_cfg.get("kind", "text"))
