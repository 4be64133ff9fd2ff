"""Deploy many: a saved level of a run as a model, without pruning again: evaluated (`evaluate_run`, the library of
`python -m gisp.evaluate`) or exported as a physically smaller Hugging Face folder or llama.cpp GGUF file
(`export_from_run`, `export_from_masks`, `export_folder_to_gguf`: the library of `python -m gisp.export`).

Any sparsity the run's trajectory reaches is a level: its masks are read out exactly (no scoring pass), written under
RUN_DIR/levels/ and applied to the model in memory; evaluation goes through the one level loop (gisp.level_loop), so
the metrics are merged into the run's results.json after every level. The slicing itself is gisp.compact.slicing
(HF folder) and gisp.compact.gguf (llama.cpp's deci architecture); a FLAP level exports with its output bias.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from gisp.compact.gguf import DTYPES, check_deci_compatible, export_gguf, export_gguf_from_folder, write_deci_gguf
from gisp.compact.slicing import compact_model_state, export_compact, write_compact_folder
from gisp.data.sources import resolve_data_dir
from gisp.errors import GispError
from gisp.eval.protocols import current_metrics
from gisp.eval.suite import EvalTaskSpec, build_evaluator, build_suites, eval_task_specs
from gisp.io import check_writable
from gisp.level_loop import LevelJob, evaluate_levels, pruned_level, record_reconstruction
from gisp.loggers import LoggerFactory
from gisp.memory.shapes import meta_structure, model_config
from gisp.models.loading import load_model_and_tokenizer
from gisp.models.spec import ModelSpec
from gisp.prune.masks import Masks
from gisp.prune.trajectory import target_key
from gisp.recovery.artefacts import Recovery, compact_model, recovered_model
from gisp.results import recovered_key
from gisp.runs import RunDir, claim, save_level

log = logging.getLogger(__name__)


def evaluate_run(run_dir: str | Path, tasks: tuple[EvalTaskSpec, ...] | list[EvalTaskSpec] | None = None,
                 sparsity: list[float] | tuple[float, ...] | None = None, dense: bool = True,
                 data_dir: Path | None = None, cache_dir: str | Path | None = None,
                 progress: bool = True, split_seed: int | None = None, loggers: LoggerFactory | None = None,
                 trust_remote_code: bool = False, recovered: str | None = None, hint: list[str] | None = None,
                 reconstruct: dict | None = None, reconstruct_overrides: list[str] | None = None,
                 compact: bool = True) -> dict[str, Any]:
    """Evaluate the dense model and the `sparsity` levels (default: the run's) of a run dir with `tasks` (default: the
    run's own evaluation settings); returns results.json. `loggers` (a gisp.loggers factory) write under
    RUN_DIR/evaluate/<time>/, made once the run dir is claimed and checked.
    `recovered`: evaluate those levels as the recovery of that name left them (gisp.recover) instead; "all": the
    levels AND every recovery of them (what changing a run's evaluation protocol needs). `hint`: the command's
    evaluation overrides, for a refusal that names how to re-evaluate. `reconstruct`: a conf/reconstruct node (None:
    the run's own; a run dir holds one, `reconstruct_overrides` name it in the refusal of another). `compact`: each
    level evaluated as its physically smaller model (False: the masked dense model; the same metrics to rounding)."""
    run = RunDir(run_dir)
    with claim(run.path):
        results = run.finished_results()
        settings = run.reconstruct_settings(reconstruct)
        new_run = [o for o in results.get("overrides") or [] if not o.lstrip("+~").startswith("reconstruct")]
        new_run += list(reconstruct_overrides or [])
        results.check_reconstruction(settings.definition(), new_run)
        if results.get("eval_settings") is None:  # a run of gisp < 0.2: its config's settings are what it holds
            results.record_eval_settings(eval_task_specs(run.config.get("eval")))
        tasks = eval_task_specs(results.eval_settings(run.config.get("eval"))) if tasks is None else tasks
        if not tasks:
            raise GispError("nothing to evaluate: the eval config has no tasks (choose eval=wikitext2, eval=cmqa, ...)")
        if recovered is not None and recovered != "all":
            Recovery(run.path, recovered).require()
            done = [k for k in results.target_keys() if recovered in (results.entry(k).get("recovered") or {})]
            sparsity = [float(k) for k in done] if sparsity is None else sparsity
            missing = [t for t in sparsity if target_key(t) not in done]
            if missing:
                raise GispError(f"the recovery {recovered!r} of {run.path} has not recovered levels {missing} (it has "
                                f"{done}): recover them first with gisp.recover")
        levels = [float(k) for k in results.target_keys()] if sparsity is None else list(sparsity)
        run.check_reaches(levels)
        run_split_seed = run.config.get("split_seed")
        if split_seed is not None and run_split_seed is not None and split_seed != run_split_seed:
            raise GispError(f"split_seed={split_seed} differs from the run's split_seed={run_split_seed}: the local "
                            f"evaluation half could overlap the calibration half; use split_seed={run_split_seed}")
        data_dir = resolve_data_dir(data_dir if data_dir is not None else run.config.get("data_dir"))
        for target in levels:  # every level's masks checked against the trajectory before anything is evaluated
            run.level(target=target, masks_only=True)
        suites = build_suites(tasks, data_dir, work_dir=run.path / "eval_data")  # refused before loading, if at all
        live = run.load_model(cache_dir, trust_remote_code=trust_remote_code)
        evaluator = build_evaluator(tasks, live.tokenizer, data_dir, work_dir=run.path / "eval_data",
                                    max_positions=getattr(live.model.config, "max_position_embeddings", None),
                                    suites=suites)
        by_key = {target_key(t): run.level(target=t, live=live) for t in levels}
        reconstructor = run.reconstructor(live, settings, data_dir)
        record_reconstruction(results, reconstructor, new_run)
        jobs = []
        if recovered in (None, "all"):  # the dense model and the pruned levels first, on the dense weights
            if dense:
                jobs.append(LevelJob("dense", results.entry("dense"), lambda: live.at(None)))
            for key, level in by_key.items():
                entry = results.entry(key)
                if not entry:
                    entry.update(added_by="gisp.evaluate")
                entry.update(level.record(), masks=save_level(run.path, key, level))
                jobs.append(LevelJob(key, entry, pruned_level(live, level, entry, reconstructor, compact), level.step))
        names = [recovered] if recovered not in (None, "all") else sorted(results.get("recovery") or {}) \
            if recovered == "all" else []
        for name in names:  # then one recovery after the other (a nested one changes the live weights)
            for key, level in by_key.items():
                if recovered == "all" and name not in (results.entry(key).get("recovered") or {}):
                    continue
                Recovery(run.path, name).verify(key)  # its stored weights, before anything is measured
                model = (lambda level=level, name=name:
                         recovered_model(run.path, name, live, reconstructor.level(level)))
                jobs.append(LevelJob(recovered_key(key, name), results.entry(recovered_key(key, name)), model,
                                     level.step))
        made = loggers(run.path / "evaluate" / time.strftime("%Y-%m-%d_%H-%M-%S"), {}) if loggers else []
        try:
            evaluate_levels(results, jobs, evaluator, specs=tasks, progress=progress, loggers=made, hint=hint)
        finally:
            live.applier.remove()
        return results.finish(loggers=made)


FORMATS = ("hf", "gguf")


def _check_request(out: str | Path | None, fmt: str, dtype: str) -> None:
    """Everything about the output that can be refused before a model is loaded."""
    if out is None or str(out).strip() in ("", "???"):
        raise GispError("no output path: add out=PATH (a new folder for format=hf, a .gguf file for format=gguf)")
    out = Path(out).expanduser()
    if out.exists():
        raise GispError(f"{out} already exists: choose a new output path (export never overwrites)")
    if fmt not in FORMATS:
        raise GispError(f"format={fmt!r} is not one of {FORMATS}: hf (a Hugging Face folder) or gguf (llama.cpp)")
    if fmt == "gguf" and dtype not in DTYPES:
        raise GispError(f"dtype={dtype!r} is not one of {sorted(DTYPES)} (the GGUF file's precision)")
    # the folders export will create: the first existing one must take a new entry (probed, nothing left behind)
    check_writable(out.parent, "output folder", "choose an output path (out=...) in a folder you can write")


def _check_masks_fit(masks: Masks, spec: ModelSpec, masks_file: str | Path) -> None:
    """The masks' shape against the model's config (built on the meta device): refused before loading weights."""
    try:
        config = model_config(spec)
    except GispError:
        return  # no config without loading (an unknown hub model offline): load_model_and_tokenizer reports
    structure, _ = meta_structure(config, torch.float32, {}, "query")  # shapes only: nothing is allocated
    want = (structure.n_layers, structure.n_heads, structure.ffn)
    got = (masks.heads.shape[0], masks.heads.shape[1], masks.channels.shape[1])
    if got != want:
        raise GispError(f"{masks_file} holds masks for {got[0]} layers x {got[1]} heads x {got[2]} MLP channels, but "
                        f"model={spec.name} has {want[0]} x {want[1]} x {want[2]}: give the model the masks were "
                        "computed for (the run's config.yaml names it), or export from the run dir (run_dir=...)")


def _write(fmt: str, model, tokenizer, masks, out, provenance, structure=None, bias=None, dtype: str = "f16",
           weights: dict | None = None) -> Path:
    """Write the export (atomically: a temporary sibling renamed at the end); a failed write is one message.
    `weights`: a reconstruction's kept columns of o_proj / down_proj (gisp.reconstruct)."""
    try:
        if fmt == "gguf":
            export_gguf(model, tokenizer, masks, out, dtype, structure, bias, provenance, weights=weights)
            return Path(out)
        return export_compact(model, tokenizer, masks, out, provenance, structure, bias, weights)
    except OSError as e:
        raise GispError(f"writing {out} failed ({e.strerror or e}): nothing was exported (no partial output is "
                        "left); free space or choose another out=...") from None


def _write_compact_model(fmt: str, model, tokenizer, level, out, provenance, structure, dtype: str) -> Path:
    """A recovered level (already a compact model) as an HF folder or a GGUF file."""
    state = compact_model_state(model)
    try:
        if fmt == "gguf":
            write_deci_gguf(state, model.config, tokenizer, out, dtype, name=str(provenance.get("model", "gisp")),
                            metadata={"sparsity": f"{level.sparsity:.6f}", "provenance": provenance})
            return Path(out)
        return write_compact_folder(state, model.config, tokenizer, level.masks, out, provenance, structure,
                                    level.bias)
    except OSError as e:
        raise GispError(f"writing {out} failed ({e.strerror or e}): nothing was exported (no partial output is "
                        "left); free space or choose another out=...") from None


def export_from_run(run_dir: str | Path, out: str | Path, sparsity: float | None = None, step: int | None = None,
                    cache_dir: str | Path | None = None, trust_remote_code: bool = False, format: str = "hf",
                    dtype: str = "f16", recovered: str | None = None, reconstruct: dict | None = None,
                    data_dir: str | Path | None = None) -> Path:
    """Export the model of a finished or partial run at one of its levels (`sparsity`, or any `step`): no pruning
    again. `format`: hf (a compact Hugging Face folder) or gguf (a llama.cpp file of precision `dtype`). `recovered`:
    the level as the recovery of that name (gisp.recover) left it, merged: the same shapes, recovered weights.
    `reconstruct`: a conf/reconstruct node (None: the run's own reconstruction), reused from the store or computed."""
    _check_request(out, format, dtype)
    run = RunDir(run_dir)
    target = sparsity
    if (target is None) == (step is None):
        raise GispError("give exactly one of sparsity=0.4 (a sparsity level of the run) or step=N")
    if recovered is not None:
        if target is None:
            raise GispError("recovered=NAME exports a recovered level: give sparsity=T (a level it recovered)")
        Recovery(run.path, recovered).require()  # named before the weights load
    if target is not None and target > run.trajectory.reached:
        raise GispError(f"the trajectory of {run.path} never reached sparsity {target:g} (it reaches "
                        f"{run.trajectory.reached:.4f}); extend it with gisp.run (sparsity=[...,{target:g}]), or "
                        f"export any step with step=N, 1..{run.trajectory.last_step}")
    # The level's masks are read (and checked against the trajectory) before the weights are loaded, so a damaged
    # file is named at once; a FLAP level's output bias is computed from the weights afterwards.
    flap = run.pruner.bias_compensation and step is None
    level = run.level(target=target, step=step, masks_only=flap)
    settings = run.reconstruct_settings(reconstruct)
    live = run.load_model(cache_dir, trust_remote_code=trust_remote_code)
    if format == "gguf":
        check_deci_compatible(live.model.config)
    if flap:
        level = run.level(target=target, live=live)
    data_dir = resolve_data_dir(data_dir if data_dir is not None else run.config.get("data_dir"))
    level = run.reconstructor(live, settings, data_dir).level(level)
    entry = ((run.results() or {}).get("targets") or {}).get(f"{target:g}", {}) if target is not None else {}
    if recovered is not None:
        model = compact_model(run.path, recovered, live, level)
        entry = (entry.get("recovered") or {}).get(recovered) or {}
        provenance = {"run_dir": str(run.path.resolve()), "model": run.model_spec().name, "step": level.step,
                      "target": target, "sparsity": level.sparsity, "recovered": recovered,
                      "reconstruction": level.reconstruction,
                      "recovery": (run.results() or {}).get("recovery", {}).get(recovered),
                      "metrics": current_metrics(run.results() or {}, entry) if entry else None}
        return _write_compact_model(format, model, live.tokenizer, level, out, provenance, live.structure, dtype)
    provenance = {"run_dir": str(run.path.resolve()), "model": run.model_spec().name, "step": level.step,
                  "prefix": level.prefix, "target": target, "sparsity": level.sparsity,
                  "reconstruction": level.reconstruction, "metrics": _level_metrics(run, entry, level)}
    return _write(format, live.model, live.tokenizer, level.masks, out, provenance, live.structure, level.bias, dtype,
                  level.weights)


def _level_metrics(run: RunDir, entry: dict, level) -> dict | None:
    """The metrics the run recorded for the level as exported: none when the export's reconstruction is not the one
    the run evaluated (they would describe other weights)."""
    if not entry:
        return None
    results = run.results() or {}
    evaluated = (entry.get("reconstruction") or {}).get("id")
    exported = (level.reconstruction or {}).get("id")
    return current_metrics(results, entry) if evaluated == exported else None


def export_from_masks(masks_file: str | Path, spec: ModelSpec, out: str | Path, cache_dir: str | Path,
                      format: str = "hf", dtype: str = "f16") -> Path:
    """Export a base model (a conf/model entry) under a masks file, e.g. one copied from another machine."""
    _check_request(out, format, dtype)
    masks = Masks.load(masks_file)
    _check_masks_fit(masks, spec, masks_file)
    model, tokenizer = load_model_and_tokenizer(spec, Path(cache_dir).expanduser())
    return _write(format, model, tokenizer, masks, out, {"masks": str(Path(masks_file).resolve())}, dtype=dtype)


def export_folder_to_gguf(folder: str | Path, out: str | Path, dtype: str = "f16") -> Path:
    """A compact HF folder written by gisp (format=hf) as a llama.cpp GGUF file."""
    _check_request(out, "gguf", dtype)
    export_gguf_from_folder(folder, out, dtype)
    return Path(out)
