"""Physical export: a masked model becomes a smaller Hugging Face folder that reloads with `from_pretrained`.

The pruned rows and columns are really removed; per-layer head/channel counts and the GQA query-to-KV index go
into the config; a layer with no heads (channels) loses its attention (MLP) block. The folder carries its own
`modeling_gisp.py`, so it loads without gisp through `trust_remote_code=True`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from gisp.compact import GispDecoderConfig
from gisp.errors import GispError
from gisp.prune.masks import Masks, sparsity
from gisp.models.families import REGISTRY, family_spec, get_submodule
from gisp.models.structure import ModelStructure, describe, layer_modules

log = logging.getLogger(__name__)
COMPACT_DIR = Path(__file__).resolve().parent / "compact"
CODE_FILES = ("configuration_gisp.py", "modeling_gisp.py")


def kv_plan(kept_q: list[int], structure: ModelStructure) -> tuple[list[int], list[int]]:
    """Kept KV heads (original indices) and, per kept query head, the position of its KV head among them.

    A KV head is dropped when no query head of its group survives; groups left unequal are fine (the index)."""
    if not structure.gqa:  # MHA: each head has its own K and V, pruned with it
        return kept_q, list(range(len(kept_q)))
    group = structure.n_heads // structure.n_kv_heads
    kept_kv = sorted({q // group for q in kept_q})
    return kept_kv, [kept_kv.index(q // group) for q in kept_q]


def _rows(weight: torch.Tensor, heads: list[int], d: int) -> torch.Tensor:
    idx = torch.tensor([h * d + j for h in heads for j in range(d)], dtype=torch.long, device=weight.device)
    return weight.index_select(0, idx).contiguous()


def compact_state_dict(model: nn.Module, masks: Masks, structure: ModelStructure) -> tuple[dict, dict]:
    """The compact weights (names as in the compact model) and the per-layer layout for its config."""
    spec = family_spec(model.config.model_type)
    layers = layer_modules(model, spec)
    d = structure.head_dim
    state: dict[str, torch.Tensor] = {}
    layout = {"layer_q_to_kv": [], "layer_kv_heads": [], "layer_intermediate_sizes": []}
    decoder = get_submodule(model, spec.layers)
    for i, m in enumerate(layers):
        if m.o.bias is not None or m.down.bias is not None:
            raise GispError("export of models with o_proj/down_proj biases is not supported")
        kept_q = masks.heads[i].nonzero().flatten().tolist()
        kept_c = masks.channels[i].nonzero().flatten().tolist()
        kept_kv, q_to_kv = kv_plan(kept_q, structure)
        p = f"model.layers.{i}."
        block = decoder[i]
        if kept_q:
            state[p + "input_layernorm.weight"] = block.input_layernorm.weight.detach()
            for name, lin, heads in (("q_proj", m.q, kept_q), ("k_proj", m.k, kept_kv), ("v_proj", m.v, kept_kv)):
                state[p + f"self_attn.{name}.weight"] = _rows(lin.weight.detach(), heads, d)
                if lin.bias is not None:
                    state[p + f"self_attn.{name}.bias"] = _rows(lin.bias.detach()[:, None], heads, d).flatten()
            state[p + "self_attn.o_proj.weight"] = _rows(m.o.weight.detach().t(), kept_q, d).t().contiguous()
            attn = get_submodule(block, spec.attention)
            for norm in ("q_norm", "k_norm"):
                if hasattr(attn, norm):
                    state[p + f"self_attn.{norm}.weight"] = getattr(attn, norm).weight.detach()
        if kept_c:
            idx = torch.tensor(kept_c, dtype=torch.long, device=m.gate.weight.device)
            state[p + "post_attention_layernorm.weight"] = block.post_attention_layernorm.weight.detach()
            state[p + "mlp.gate_proj.weight"] = m.gate.weight.detach().index_select(0, idx).contiguous()
            state[p + "mlp.up_proj.weight"] = m.up.weight.detach().index_select(0, idx).contiguous()
            state[p + "mlp.down_proj.weight"] = m.down.weight.detach().index_select(1, idx).contiguous()
        layout["layer_q_to_kv"].append(q_to_kv)
        layout["layer_kv_heads"].append(len(kept_kv))
        layout["layer_intermediate_sizes"].append(len(kept_c))
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    state["model.embed_tokens.weight"] = inner.embed_tokens.weight.detach()
    state["model.norm.weight"] = inner.norm.weight.detach()
    if not model.config.tie_word_embeddings:
        state["lm_head.weight"] = model.get_output_embeddings().weight.detach()
    return state, layout


def compact_config(model: nn.Module, structure: ModelStructure, layout: dict) -> GispDecoderConfig:
    c = model.config
    first = layer_modules(model, family_spec(c.model_type))[0]
    attn = get_submodule(get_submodule(model, family_spec(c.model_type).layers)[0], "self_attn")
    sliding = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
    config = GispDecoderConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, head_dim=structure.head_dim,
        num_hidden_layers=structure.n_layers, num_attention_heads=structure.n_heads,
        num_key_value_heads=structure.n_kv_heads, hidden_act=c.hidden_act, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, rope_parameters=dict(c.rope_parameters),
        attention_bias=first.q.bias is not None, mlp_bias=first.gate.bias is not None,
        qk_norm=hasattr(attn, "q_norm"), sliding_window=sliding, base_model_type=c.model_type,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id, **layout,
    )
    config.auto_map = {"AutoConfig": "configuration_gisp.GispDecoderConfig",
                       "AutoModelForCausalLM": "modeling_gisp.GispDecoderForCausalLM"}
    config.architectures = ["GispDecoderForCausalLM"]
    config.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return config


def export_compact(model: nn.Module, tokenizer, masks: Masks, out: str | Path, provenance: dict | None = None,
                   structure: ModelStructure | None = None) -> Path:
    """Write the compact model of `model` under `masks` to the new folder `out` (atomically: all or nothing)."""
    out = Path(out)
    if model.config.model_type not in REGISTRY:
        raise GispError(f"model family '{model.config.model_type}' has no export support; supported: "
                        f"{sorted(REGISTRY)}")
    if out.exists():
        raise GispError(f"{out} already exists: choose a new output folder (export never overwrites)")
    structure = structure or describe(model)
    state, layout = compact_state_dict(model, masks, structure)
    config = compact_config(model, structure, layout)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(tmp)
        for name in CODE_FILES:
            shutil.copy(COMPACT_DIR / name, tmp / name)
        masks.save(tmp / "gisp_masks.safetensors")  # which original heads/channels were kept: the replayable record
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp makes the folder private; give it the usual permissions
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        params = sum(v.numel() for v in state.values())
        record = {"sparsity": sparsity(masks, structure), "parameters": params, **(provenance or {})}
        (tmp / "gisp_export.json").write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s parameters to %s", f"{params:,}", out)
    return out


def export_from_run(run_dir: str | Path, out: str | Path, target: float | None = None, step: int | None = None,
                    cache_dir: str | Path | None = None) -> Path:
    """Export the model of a finished or partial run at one of its targets (or any step): no pruning again."""
    from gisp.builders import load_run_model
    from gisp.prune.trajectory import Trajectory, target_key

    run_dir, out = Path(run_dir), Path(out)
    if out.exists():
        raise GispError(f"{out} already exists: choose a new output folder (export never overwrites)")
    traj = Trajectory.load(run_dir / "trajectory")
    if (target is None) == (step is None):
        raise GispError("give exactly one of target=0.4 (a sparsity target of the run) or step=N")
    if target is not None:
        reached = traj.manifest["targets"]
        if target_key(target) not in reached:
            raise GispError(f"the run in {run_dir} never reached target {target:g}; its targets: {sorted(reached)} "
                            f"(or export any step with step=N, 1..{traj.last_step})")
        step = reached[target_key(target)]
    if traj.bias_at(step) is not None:
        raise GispError(f"step {step} of {run_dir} carries an output bias (FLAP's compensation); the compact model has "
                        "no o_proj/down_proj bias yet, so exporting it would silently change the model. Evaluate "
                        "it in place with gisp.evaluate, or export a level without bias compensation")
    masks = traj.masks_at(step)
    cfg, model, tokenizer = load_run_model(run_dir, cache_dir)
    structure = describe(model, protected=tuple(traj.manifest["meta"]["structure"]["protected"]))
    record = traj.step_record(step)
    provenance = {"run_dir": str(run_dir.resolve()), "model": cfg.model.name, "step": step, "target": target,
                  "metrics": record.get("metrics")}
    return export_compact(model, tokenizer, masks, out, provenance, structure)


def export_from_masks(masks_file: str | Path, model_cfg, out: str | Path, cache_dir: str | Path) -> Path:
    """Export a base model (a conf/model entry) under a masks file, e.g. one copied from another machine."""
    from gisp.builders import model_spec
    from gisp.models.loading import load_model_and_tokenizer

    if Path(out).exists():
        raise GispError(f"{out} already exists: choose a new output folder (export never overwrites)")
    masks = Masks.load(masks_file)
    model, tokenizer = load_model_and_tokenizer(model_spec(model_cfg), Path(cache_dir).expanduser())
    return export_compact(model, tokenizer, masks, out, {"masks": str(Path(masks_file).resolve())})


def _main() -> None:
    """`python -m gisp.export run_dir=DIR target=0.4 out=OUT` or `masks=FILE model=NAME out=OUT`."""
    import sys

    import hydra

    @hydra.main(version_base="1.3", config_path="../conf", config_name="export")
    def main(cfg) -> None:
        try:
            if cfg.run_dir is not None:
                path = export_from_run(cfg.run_dir, cfg.out, cfg.target, cfg.step, cfg.cache_dir)
            elif cfg.masks is not None and cfg.get("model") is not None:
                path = export_from_masks(cfg.masks, cfg.model, cfg.out, cfg.cache_dir)
            else:
                raise GispError("give run_dir=DIR target=T (or step=N), or masks=FILE model=NAME; and out=OUT")
        except GispError as e:
            log.error("%s", e)
            sys.exit(2)
        print(f"gisp: exported to {path} (load with AutoModelForCausalLM.from_pretrained(path) after `import gisp`, "
              "or with trust_remote_code=True without gisp)")

    main()


if __name__ == "__main__":
    _main()
