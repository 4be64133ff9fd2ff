"""Entry point: export a level of a run (or a masks file) as a physically smaller Hugging Face folder or a llama.cpp
GGUF file. Thin: Hydra in, gisp.deploy's export out.

    python -m gisp.export run_dir=outputs/smollm2_135m/<run> sparsity=0.4 out=exports/smollm2_40   # or step=N
    python -m gisp.export masks=RUN/levels/level_0.4.safetensors model=smollm2_135m out=exports/smollm2_40
    python -m gisp.export run_dir=... sparsity=0.4 format=gguf out=smollm2_40.gguf [dtype=f16|f32|q8_0]
    python -m gisp.export compact=exports/smollm2_40 format=gguf out=smollm2_40.gguf   # an exported HF folder
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from gisp.cli import plain_config, run_command, same_command, user_errors
from gisp.config import cache_dir_setting, levels_setting, model_spec
from gisp.deploy import export_folder_to_gguf, export_from_masks, export_from_run
from gisp.errors import GispError


def stop_message(signal_name: str) -> str:
    return (f"stopped by {signal_name}: nothing was exported (the output is written under a temporary name and "
            f"renamed at the end); run the same command again:\n  {same_command()}")


def one_level(cfg: dict) -> float | None:
    levels = levels_setting(cfg, old="target")
    if levels is not None and len(levels) != 1:
        raise GispError(f"gisp.export writes one level: give one sparsity (sparsity=0.4), not {list(levels)}")
    return None if levels is None else levels[0]


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@user_errors(stop_message=stop_message, resumable=False)
def main(cfg: DictConfig) -> None:
    c = plain_config(cfg)
    trust, fmt, dtype = bool(c.get("trust_remote_code")), str(c["format"]), str(c["dtype"])
    if c.get("run_dir") is not None:
        path = export_from_run(c["run_dir"], c.get("out"), one_level(c), c.get("step"), c.get("cache_dir"),
                               trust_remote_code=trust, format=fmt, dtype=dtype, recovered=c.get("recovered"),
                               reconstruct=c.get("reconstruct"), data_dir=c.get("data_dir"))
    elif c.get("reconstruct") is not None:
        raise GispError("reconstruct= needs the run's data and trajectory: export a run's level (run_dir=... "
                        "sparsity=T reconstruct=...), not a masks file or a compact folder")
    elif c.get("masks") is not None and c.get("model") is not None:
        path = export_from_masks(c["masks"], model_spec(c["model"]), c.get("out"),
                                 cache_dir_setting(c.get("cache_dir")), fmt, dtype)
    elif c.get("compact") is not None:
        if fmt != "gguf":
            raise GispError("compact=DIR converts an exported Hugging Face folder to GGUF: add format=gguf")
        path = export_folder_to_gguf(c["compact"], c.get("out"), dtype)
    else:
        raise GispError("give run_dir=DIR sparsity=T (or step=N), masks=FILE model=NAME, or compact=DIR format=gguf; "
                        "and out=OUT")
    if fmt == "gguf":
        print(f"gisp: exported to {path} (llama.cpp architecture deci: llama-cli -m {path}, or "
              "llama_cpp.Llama(model_path=...))")
    else:
        print(f"gisp: exported to {path} (load with AutoModelForCausalLM.from_pretrained(path) after `import gisp`, "
              "or with trust_remote_code=True without gisp)")


if __name__ == "__main__":
    run_command(main)
