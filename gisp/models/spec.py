"""What a model is, as typed plain values: where it comes from (hub, local folder, GGUF file or package, random) and
how to build it. The bottom of gisp.models: the loaders (gisp.models.loading, gisp.models.gguf) read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gisp.errors import GispError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to build it; plain values so it is hashable and Hydra-free.

    ``source`` picks the fields that matter: ``hub``/``local`` use ``path`` (+ ``revision``),
    ``gguf_package`` uses ``package`` + ``file``, ``gguf_parts`` uses ``parts`` (``"package:file"`` pieces of one
    GGUF file, in order) + ``sha256`` (of the joined file), ``random`` uses ``model_type`` + ``config`` + ``seed``.
    ``attn_implementation=None`` keeps the transformers default (sdpa). ``shape``: the model's HF config fields
    (``model_type``, sizes) written in its conf/model YAML, so that gisp.plan plans a hub or packaged model offline;
    the weights' own config is what loads, and ``shape`` is not part of a trajectory's definition.
    """

    name: str
    source: str
    path: str | None = None
    revision: str | None = None
    package: str | None = None
    file: str | None = None
    model_type: str | None = None
    config: dict | None = None
    seed: int = 0
    dtype: str = "float32"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    parts: tuple[str, ...] | None = None
    sha256: str | None = None
    shape: dict | None = None  # the HF config fields of a hub / packaged model, for memory plans without loading

    def __post_init__(self) -> None:
        if isinstance(self.parts, list):  # from a config node
            object.__setattr__(self, "parts", tuple(self.parts))
        if self.source == "path":  # model=hf: what the path is decides the source
            object.__setattr__(self, "source", path_source(self.name, self.path))
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", auto_dtype())


def path_source(name: str, path: str | None) -> str:
    """The source of `model=hf model.path=...`: a local .gguf file, a local folder, or a hub id (ORG/NAME)."""
    if not path:
        raise GispError(f"Model '{name}': model=hf needs model.path=ORG/NAME (the hub), a local save_pretrained "
                        "folder, or a local .gguf file")
    local = Path(path).expanduser()
    if path.lower().endswith(".gguf"):
        if not local.is_file():
            raise GispError(f"Model '{name}': GGUF file {local} does not exist (model.path)")
        return "gguf_file"
    if local.is_dir():
        return "local"
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise GispError(f"Model '{name}': model.path={path} is not a folder, a .gguf file or a hub id ORG/NAME")
    return "hub"


def model_name_from_path(path: str | None) -> str:
    """A run-dir name from a model path: 'Qwen/Qwen2.5-0.5B' -> 'qwen2_5_0_5b', '/m/phi-2/' -> 'phi_2'."""
    if not path:
        return "hf"
    stem = Path(str(path).rstrip("/")).name.removesuffix(".gguf").removesuffix(".GGUF")
    return "".join(c if c.isalnum() else "_" for c in stem.lower()).strip("_") or "hf"


def auto_dtype() -> str:
    """model.dtype=auto: bfloat16 on a CUDA GPU that has it (half the memory, the precision models ship in), else
    float32 (CPU matmuls in bf16 are slow and round the scores)."""
    native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)  # not V100 / T4
    return "bfloat16" if native else "float32"


def first_line(exc: BaseException) -> str:
    """The first line of an exception message, to keep GispError messages short."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
