"""Export a level of a run (or a masks file) as a physically smaller Hugging Face folder or a llama.cpp GGUF file.

    python -m gisp.export run_dir=outputs/smollm2_135m/<run> target=0.4 out=exports/smollm2_40   # or step=N
    python -m gisp.export masks=RUN/trajectory/step_0008.safetensors model=smollm2_135m out=exports/smollm2_40
    python -m gisp.export run_dir=... target=0.4 format=gguf out=smollm2_40.gguf [dtype=f16|f32|q8_0]
    python -m gisp.export compact=exports/smollm2_40 format=gguf out=smollm2_40.gguf   # an exported HF folder

The slicing itself is gisp.compact.slicing (HF folder) and gisp.compact.gguf (llama.cpp's deci architecture); this
module finds the level and the model. A FLAP level exports with its output bias (o_proj / down_proj biases).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gisp.cli import same_command, user_errors
from gisp.compact.gguf import DTYPES, check_deci_compatible, export_gguf, export_gguf_from_folder, write_deci_gguf
from gisp.compact.slicing import compact_model_state, export_compact, write_compact_folder
from gisp.config import model_spec
from gisp.errors import GispError
from gisp.eval.protocols import current_metrics
from gisp.io import check_writable
from gisp.models.loading import ModelSpec, load_model_and_tokenizer
from gisp.plan import meta_structure, model_config
from gisp.prune.masks import Masks
from gisp.recover.artefacts import Recovery, compact_model
from gisp.runs import RunDir

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


def _write(fmt: str, model, tokenizer, masks, out, provenance, structure=None, bias=None, dtype: str = "f16") -> Path:
    """Write the export (atomically: a temporary sibling renamed at the end); a failed write is one message."""
    try:
        if fmt == "gguf":
            export_gguf(model, tokenizer, masks, out, dtype, structure, bias, provenance)
            return Path(out)
        return export_compact(model, tokenizer, masks, out, provenance, structure, bias)
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


def stop_message(signal_name: str) -> str:
    return (f"stopped by {signal_name}: nothing was exported (the output is written under a temporary name and "
            f"renamed at the end); run the same command again:\n  {same_command()}")


def export_from_run(run_dir: str | Path, out: str | Path, target: float | None = None, step: int | None = None,
                    cache_dir: str | Path | None = None, trust_remote_code: bool = False, format: str = "hf",
                    dtype: str = "f16", recovered: str | None = None) -> Path:
    """Export the model of a finished or partial run at one of its targets (or any step): no pruning again.
    `format`: hf (a compact Hugging Face folder) or gguf (a llama.cpp file of precision `dtype`). `recovered`: the
    level as the recovery of that name (gisp.recover) left it, merged: the same shapes, recovered weights."""
    _check_request(out, format, dtype)
    run = RunDir(run_dir)
    if (target is None) == (step is None):
        raise GispError("give exactly one of target=0.4 (a sparsity target of the run) or step=N")
    if recovered is not None:
        if target is None:
            raise GispError("recovered=NAME exports a recovered target: give target=T (a level it recovered)")
        Recovery(run.path, recovered).require()  # named before the weights load
    if target is not None and target > run.trajectory.reached:
        raise GispError(f"the trajectory of {run.path} never reached sparsity {target:g} (it reaches "
                        f"{run.trajectory.reached:.4f}); extend it with gisp.run (sparsity=[...,{target:g}]), or "
                        f"export any step with step=N, 1..{run.trajectory.last_step}")
    # The level's masks are read (and checked against the trajectory) before the weights are loaded, so a damaged
    # file is named at once; a FLAP level's output bias is computed from the weights afterwards.
    flap = run.pruner.bias_compensation and step is None
    level = run.level(target=target, step=step, masks_only=flap)
    live = run.load_model(cache_dir, trust_remote_code=trust_remote_code)
    if format == "gguf":
        check_deci_compatible(live.model.config)
    if flap:
        level = run.level(target=target, live=live)
    entry = ((run.results() or {}).get("targets") or {}).get(f"{target:g}", {}) if target is not None else {}
    if recovered is not None:
        model = compact_model(run.path, recovered, live, level)
        entry = (entry.get("recovered") or {}).get(recovered) or {}
        provenance = {"run_dir": str(run.path.resolve()), "model": run.model_spec().name, "step": level.step,
                      "target": target, "sparsity": level.sparsity, "recovered": recovered,
                      "recovery": (run.results() or {}).get("recovery", {}).get(recovered),
                      "metrics": current_metrics(run.results() or {}, entry) if entry else None}
        return _write_compact_model(format, model, live.tokenizer, level, out, provenance, live.structure, dtype)
    provenance = {"run_dir": str(run.path.resolve()), "model": run.model_spec().name, "step": level.step,
                  "prefix": level.prefix, "target": target, "sparsity": level.sparsity,
                  "metrics": current_metrics(run.results() or {}, entry) if entry else None}
    return _write(format, live.model, live.tokenizer, level.masks, out, provenance, live.structure, level.bias, dtype)


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@user_errors(stop_message=stop_message, resumable=False)
def main(cfg: DictConfig) -> None:
    trust = bool(cfg.get("trust_remote_code"))
    fmt, dtype = str(cfg.format), str(cfg.dtype)
    if cfg.run_dir is not None:
        path = export_from_run(cfg.run_dir, cfg.out, cfg.target, cfg.step, cfg.cache_dir, trust_remote_code=trust,
                               format=fmt, dtype=dtype, recovered=cfg.get("recovered"))
    elif cfg.masks is not None and cfg.get("model") is not None:
        path = export_from_masks(cfg.masks, model_spec(cfg.model), cfg.out, cfg.cache_dir, fmt, dtype)
    elif cfg.get("compact") is not None:
        if fmt != "gguf":
            raise GispError("compact=DIR converts an exported Hugging Face folder to GGUF: add format=gguf")
        path = export_folder_to_gguf(cfg.compact, cfg.out, dtype)
    else:
        raise GispError("give run_dir=DIR target=T (or step=N), masks=FILE model=NAME, or compact=DIR format=gguf; "
                        "and out=OUT")
    if fmt == "gguf":
        print(f"gisp: exported to {path} (llama.cpp architecture deci: llama-cli -m {path}, or "
              "llama_cpp.Llama(model_path=...))")
    else:
        print(f"gisp: exported to {path} (load with AutoModelForCausalLM.from_pretrained(path) after `import gisp`, "
              "or with trust_remote_code=True without gisp)")


if __name__ == "__main__":
    main()
