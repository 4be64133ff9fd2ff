"""OWL and ShortGPT against slow references on tiny models, their levels (targets, nesting, whole layers for
ShortGPT) through the real pipeline, and the export of levels with removed layers (HF and GGUF)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import SMOKE, tiny_model
from test_methods import calibration

from gisp.config import load_settings
from gisp.lightning.datamodule import CalibrationData
from gisp.lightning.scoring import activation_pass
from gisp.models.families import family_spec
from gisp.models.structure import describe, layer_modules
from gisp.pipeline import run
from gisp.prune.masks import Masks
from gisp.prune.methods import pruner_spec
from gisp.prune.ranking import cut_layers, cut_owl, owl_layer_sparsity
from gisp.runs import RunDir

OWL = {"name": "owl", "score": "owl", "ranking": "owl", "options": {"outlier_m": 2.0, "outlier_lambda": 0.08}}
SHORTGPT = {"name": "shortgpt", "score": "block_influence", "ranking": "layers"}


def _pass(model, spec, calib):
    structure = describe(model)
    layers = layer_modules(model, family_spec(model.config.model_type))
    module = activation_pass(model, layers, structure, len(calib), spec)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    with module.recorder:
        trainer.validate(module, datamodule=CalibrationData(calib, 4), verbose=False)
    return structure, layers, module


def _inputs(model, layers, ids, names):
    """Every token's input to each projection of `names`, per layer (the slow path)."""
    store, handles = {}, []
    for i, m in enumerate(layers):
        for name in names:
            def hook(module, args, key=(i, name)):
                store.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
            handles.append(getattr(m, name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_owl_outlier_ratios_and_layer_sparsities_equal_a_slow_reference(family):
    model = tiny_model(family, layers=6)
    ids, calib = calibration(n=8)
    spec = pruner_spec(OWL)
    structure, layers, module = _pass(model, spec, calib)
    inputs = _inputs(model, layers, ids, ("q", "k", "v", "o", "gate", "up", "down"))
    for i in structure.unprotected:
        scores = []  # OWL: every weight's |W_ij| * ||x_j|| (||x_j|| over all calibration tokens), the whole block
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            w, x = getattr(layers[i], name).weight.double(), inputs[(i, name)]
            norms = torch.tensor([float(x[:, j].pow(2).sum().sqrt()) for j in range(x.shape[1])], dtype=torch.float64)
            scores.append((w.abs() * norms[None, :]).flatten())
        s = torch.cat(scores)
        want = float((s > 2.0 * s.mean()).double().mean())
        assert module.extra["outlier_ratio"][i] == pytest.approx(want, abs=1e-9)
    d = module.extra["outlier_ratio"]
    ratios = owl_layer_sparsity(d, structure, 0.4, 0.08)
    unprotected = list(structure.unprotected)
    x = d[unprotected]
    r = (x - x.min()) / (x.max() - x.min()) * 0.16  # OWL: scaled to [0, 2 lambda], centred on 1 - target
    r = r - r.mean() + (1 - 0.4)
    assert [ratios[i] for i in unprotected] == pytest.approx((1 - r).tolist())
    assert sum(ratios.values()) / len(ratios) == pytest.approx(0.4)
    heads, channels = module.scores
    levels = [cut_owl(heads, channels, Masks.dense(structure), structure, t, stats=module.extra, pruner=spec)
              for t in (0.2, 0.3, 0.4)]
    for t, level in zip((0.2, 0.3, 0.4), levels):
        tolerance = len(unprotected) * structure.channel_params / structure.decoder_params
        assert abs(level.sparsity - t) <= tolerance
    assert levels[1].masks.is_nested_in(levels[0].masks) and levels[2].masks.is_nested_in(levels[1].masks)
    kept = [int(levels[2].masks.channels[i].sum()) for i in unprotected]
    assert len(set(kept)) > 1  # the layers really get different sparsities


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_block_influence_equals_the_hidden_state_similarity(family):
    model = tiny_model(family, layers=6)
    ids, calib = calibration(n=8)
    structure, _, module = _pass(model, pruner_spec(SHORTGPT), calib)
    states = {}

    def hook(module_, args, kwargs, output, i=None):
        x_in = args[0] if args else kwargs["hidden_states"]
        x_out = output[0] if isinstance(output, tuple) else output
        states.setdefault(i, []).append((x_in.detach().double(), x_out.detach().double()))

    decoder = model.model.layers
    handles = [decoder[i].register_forward_hook(lambda m, a, k, o, i=i: hook(m, a, k, o, i), with_kwargs=True)
               for i in range(len(decoder))]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    for i in structure.unprotected:
        x_in, x_out = (x.reshape(-1, x.shape[-1]) for x in states[i][0])  # (tokens, hidden)
        cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in zip(x_in, x_out)]
        assert float(module.extra["block_influence"][i]) == pytest.approx(1 - sum(cos) / len(cos), abs=1e-9)
    heads, channels = module.scores
    plan = cut_layers(heads, channels, Masks.dense(structure), structure, 0.3, stats=module.extra)
    removed = [i for i in range(structure.n_layers) if not plan.masks.heads[i].any()]
    assert removed and all(not plan.masks.channels[i].any() for i in removed)  # whole layers
    bi = module.extra["block_influence"]
    assert sorted(removed) == sorted(sorted(structure.unprotected, key=lambda i: float(bi[i]))[:len(removed)])
    layer = (structure.n_units * structure.head_params + structure.ffn * structure.channel_params)
    assert abs(plan.sparsity - 0.3) <= 0.5 * layer / structure.decoder_params + 1e-9  # the closest layer count


def test_owl_and_shortgpt_land_on_their_targets_and_export(compose_cfg, tmp_path):
    """Through the real pipeline: nested levels on their targets (OWL within a channel per layer, ShortGPT within
    one layer); a ShortGPT level exports (whole layers without blocks) to HF and to GGUF, equal to the masked model."""
    from gisp.compact import GispDecoderForCausalLM
    from gisp.deploy import export_from_run

    for pruner, tolerance_layers in (("owl", False), ("shortgpt", True)):
        cfg = compose_cfg(*SMOKE, f"pruner={pruner}", "sparsity=[0.2,0.3,0.45]", "model.config.num_hidden_layers=8",
                          "eval=none")
        results = run(load_settings(cfg), tmp_path / pruner)
        run_dir = RunDir(tmp_path / pruner)
        levels = [run_dir.level(target=t) for t in (0.2, 0.3, 0.45)]
        assert levels[1].masks.is_nested_in(levels[0].masks) and levels[2].masks.is_nested_in(levels[1].masks)
        assert results["method"]["pruner"] == pruner
        if tolerance_layers:
            for level in levels:
                gone = [i for i in range(8) if not level.masks.heads[i].any()]
                assert gone and all(not level.masks.channels[i].any() for i in gone)
                assert all(level.masks.heads[i].all() and level.masks.channels[i].all() for i in range(8)
                           if i not in gone)
    live = RunDir(tmp_path / "shortgpt").load_model()
    level = RunDir(tmp_path / "shortgpt").level(target=0.45)
    live.set_level(level)
    out = export_from_run(tmp_path / "shortgpt", tmp_path / "hf", sparsity=0.45)
    compact = GispDecoderForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = live.model(ids).logits
        torch.testing.assert_close(compact(ids).logits, want, rtol=1e-4, atol=1e-5)
    assert sum(not q for q in compact.config.layer_q_to_kv) >= 1  # layers without attention
    llama_cpp = pytest.importorskip("llama_cpp")
    gguf = export_from_run(tmp_path / "shortgpt", tmp_path / "s.gguf", sparsity=0.45, format="gguf", dtype="f32")
    llm = llama_cpp.Llama(model_path=str(gguf), logits_all=True, n_threads=1, verbose=False, n_ctx=64)
    llm.eval(ids[0].tolist())
    torch.testing.assert_close(torch.tensor(llm.scores[:24]), want[0], rtol=1e-3, atol=2e-3)
