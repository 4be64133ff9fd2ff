"""gisp: Global Iterative Structured Pruning of LLM decoders (arXiv 2510.18030).

The public API (imported lazily, so `import gisp` stays fast):

    gisp.run_pruning(settings, run_dir)    prune along the trajectory (settings: gisp.load_settings(cfg));
                                           `gisp.run` is the command-line module, hence the longer name
    gisp.evaluate_run(run_dir, tasks, ...)  evaluate saved levels ("deploy many")
    gisp.export_from_run(run_dir, out, sparsity=0.4)   a physically smaller Hugging Face folder (format="gguf":
                                           a llama.cpp file; gisp.export_gguf for a live model and masks)
    gisp.recover_run(run_dir, settings, sparsity=[0.5])   recover levels (LoRA, distillation, nested)
    gisp.RunDir(path)                       reopen a run: config, trajectory, results, model, levels
    gisp.Results(run_dir)                   the one owner of a run dir's results.json
    gisp.Masks, gisp.MaskApplier            keep-masks and their reversible application to a live model
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY: dict[str, str | tuple[str, str]] = {
    "run_pruning": ("gisp.pipeline", "run"),
    "load_settings": "gisp.config",
    "RunSettings": "gisp.config",
    "evaluate_run": "gisp.deploy",
    "export_from_run": "gisp.deploy",
    "export_from_masks": "gisp.deploy",
    "recover_run": "gisp.recovery.runner",
    "Results": "gisp.results",
    "export_compact": "gisp.compact.slicing",
    "export_gguf": "gisp.compact.gguf",
    "RunDir": "gisp.runs",
    "Masks": "gisp.prune.masks",
    "MaskApplier": "gisp.prune.masks",
    "GispError": "gisp.errors",
    "EvalTaskSpec": "gisp.eval.suite",
}
__all__ = [
    "EvalTaskSpec",
    "GispError",
    "MaskApplier",
    "Masks",
    "Results",
    "RunDir",
    "RunSettings",
    "evaluate_run",
    "export_compact",
    "export_from_masks",
    "export_from_run",
    "export_gguf",
    "load_settings",
    "recover_run",
    "run_pruning",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gisp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# `import gisp` is all it takes for AutoModelForCausalLM.from_pretrained(EXPORTED_FOLDER) to work: the compact
# model's classes register with the Auto classes (transformers is imported here; torch comes with it).
from gisp.compact import register_auto_classes

register_auto_classes()
