"""Baselines against slow references on tiny models, FLAP's bias compensation, and every method landing on its
sparsity targets through the real pipeline."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import SMOKE, compose, tiny_model
from test_importance import full_batch_grads, slow_scores

from gisp.config import load_settings
from gisp.data.calibration import from_windows
from gisp.errors import GispError
from gisp.io import read_json
from gisp.lightning.datamodule import CalibrationData
from gisp.lightning.scoring import ActivationPass
from gisp.models.families import family_spec
from gisp.models.structure import describe, layer_modules
from gisp.pipeline import run
from gisp.prune.activations import InputRecorder
from gisp.prune.importance import get_score
from gisp.prune.masks import MaskApplier, Masks, sparsity
from gisp.prune.methods import flap_bias, pruner_spec
from gisp.prune.objectives import OBJECTIVES
from gisp.prune.ranking import cut_global, cut_local, local_counts
from gisp.runs import RunDir

PRUNERS = ["gisp", "oneshot", "llm_pruner", "wanda_sp", "flap", "magnitude", "random"]


def calibration(n=6, seq_len=20, seed=1):
    ids = torch.randint(0, 300, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    return ids, from_windows(ids, OBJECTIVES["ppl"])


def recorded_inputs(model, layers, ids, lengths=None):
    """Every token's input to o_proj and down_proj, per layer, kept whole (the slow path), pads dropped."""
    store = {}
    handles = []
    for i, m in enumerate(layers):
        for block, lin in (("attn", m.o), ("mlp", m.down)):
            def hook(module, args, key=(i, block)):
                store.setdefault(key, []).append(args[0].detach().clone())
            handles.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in range(ids.shape[0]):  # one unpadded sequence at a time: no mask needed
            n = ids.shape[1] if lengths is None else lengths[b]
            model(input_ids=ids[b: b + 1, :n])
    for h in handles:
        h.remove()
    return {k: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]).double() for k, v in store.items()}


def activation_pass(model, layers, structure, calib, spec, batch_size=4):
    module = ActivationPass(model, layers, structure, len(calib),
                              score_fn=lambda moments: get_score(spec.score).scores(layers, structure, moments, spec))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    with module.recorder:
        trainer.validate(module, datamodule=CalibrationData(calib, batch_size), verbose=False)
    return module


def slow_wanda(model, structure, inputs):
    layers = layer_modules(model, family_spec(model.config.model_type))
    heads = torch.full((structure.n_layers, structure.n_heads), float("inf"))
    channels = torch.full((structure.n_layers, structure.ffn), float("inf"))
    d_h = structure.head_dim
    for i in structure.unprotected:
        w_o, w_d = layers[i].o.weight.double(), layers[i].down.weight.double()
        x_o, x_d = inputs[(i, "attn")], inputs[(i, "mlp")]
        for h in range(structure.n_heads):
            heads[i, h] = sum(float((w_o[:, j].abs() * x_o[:, j].pow(2).mean().sqrt()).mean())
                              for j in range(h * d_h, (h + 1) * d_h))
        for j in range(structure.ffn):
            channels[i, j] = float((w_d[:, j].abs() * x_d[:, j].pow(2).mean().sqrt()).mean())
    return heads, channels


def slow_flap(model, structure, inputs):
    layers = layer_modules(model, family_spec(model.config.model_type))
    heads = torch.full((structure.n_layers, structure.n_heads), float("inf"))
    channels = torch.full((structure.n_layers, structure.ffn), float("inf"))
    d_h = structure.head_dim
    for i in structure.unprotected:
        for block, w in (("attn", layers[i].o.weight), ("mlp", layers[i].down.weight)):
            x = inputs[(i, block)]
            metric = torch.tensor([float(x[:, j].var(unbiased=False) * w[:, j].double().pow(2).sum())
                                   for j in range(x.shape[1])], dtype=torch.float64)
            z = (metric - metric.mean()) / metric.std()  # standardized within the layer's module
            if block == "attn":
                heads[i] = torch.stack([z[h * d_h:(h + 1) * d_h].mean() for h in range(structure.n_heads)]).float()
            else:
                channels[i] = z.float()
    return heads, channels


@pytest.mark.parametrize("score, slow", [("wanda", slow_wanda), ("fluctuation", slow_flap)])
def test_activation_scores_equal_slow_reference(family, score, slow):
    model = tiny_model(family)
    structure = describe(model)
    layers = layer_modules(model, family_spec(model.config.model_type))
    ids, calib = calibration()
    spec = pruner_spec({"name": score, "score": score, "ranking": "local"})
    module = activation_pass(model, layers, structure, calib, spec)
    ref_h, ref_c = slow(model, structure, recorded_inputs(model, layers, ids))
    torch.testing.assert_close(module.scores[0], ref_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(module.scores[1], ref_c, rtol=1e-4, atol=1e-6)
    assert all(not lin._forward_pre_hooks for m in layers for lin in (m.o, m.down))  # hooks gone after the pass


def test_padded_tokens_do_not_count():
    """Variable-length calibration (CMQA-style): statistics over real tokens only, whatever the batching."""
    model = tiny_model("mistral")
    structure = describe(model)
    layers = layer_modules(model, family_spec("mistral"))
    lengths = [20, 7, 13, 20, 3, 11]
    ids, _ = calibration()
    from gisp.data.calibration import CalibrationSet

    calib = CalibrationSet([ids[b, :n] for b, n in enumerate(lengths)], [ids[b, :n] for b, n in enumerate(lengths)],
                           torch.full((len(lengths),), 1.0 / len(lengths), dtype=torch.float64), pad_id=0)
    spec = pruner_spec({"name": "wanda_sp", "score": "wanda", "ranking": "local"})
    batched = activation_pass(model, layers, structure, calib, spec, batch_size=3).scores
    ref = slow_wanda(model, structure, recorded_inputs(model, layers, ids, lengths))
    torch.testing.assert_close(batched[0], ref[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batched[1], ref[1], rtol=1e-4, atol=1e-6)


def test_recorder_removes_hooks_after_an_error():
    model = tiny_model("llama")
    structure = describe(model)
    layers = layer_modules(model, family_spec("llama"))
    with pytest.raises(RuntimeError), InputRecorder(layers, structure):
        assert layers[1].o._forward_pre_hooks
        raise RuntimeError("boom")
    assert all(not lin._forward_pre_hooks for m in layers for lin in (m.o, m.down))


def test_magnitude_and_random_scores(family):
    model = tiny_model(family)
    structure = describe(model)
    layers = layer_modules(model, family_spec(model.config.model_type))
    spec = pruner_spec({"name": "m", "score": "magnitude", "ranking": "local"})
    heads, channels = get_score(spec.score).scores(layers, structure, None, spec)
    d_h = structure.head_dim
    for i in structure.unprotected:
        m = layers[i]
        for h in range(structure.n_heads):
            rows = slice(h * d_h, (h + 1) * d_h)
            ref = m.q.weight[rows].pow(2).sum() + m.o.weight[:, rows].pow(2).sum()
            if not structure.gqa:
                ref += m.k.weight[rows].pow(2).sum() + m.v.weight[rows].pow(2).sum()
            assert heads[i, h].item() == pytest.approx(ref.item(), rel=1e-5)
        for j in range(structure.ffn):
            ref = m.gate.weight[j].pow(2).sum() + m.up.weight[j].pow(2).sum() + m.down.weight[:, j].pow(2).sum()
            assert channels[i, j].item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.isinf(heads[list(structure.protected)]).all()
    spec = pruner_spec({"name": "r", "score": "random", "ranking": "local", "seed": 3})
    score = get_score(spec.score)
    a, b = score.scores(layers, structure, None, spec), score.scores(layers, structure, None, spec)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # seeded


def test_llm_pruner_is_local_taylor_on_the_dense_gradient(family):
    """LLM-Pruner: raw |W*g| per structure (the slow reference of test_scoring) and the same number of heads and of
    channels pruned in every unprotected layer, each layer's lowest."""
    model = tiny_model(family)
    structure = describe(model)
    ids = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(1))
    full_batch_grads(model, ids)
    heads, channels = (s.detach() for s in slow_scores(model, structure))
    plan = cut_local(heads, channels, Masks.dense(structure), structure, 0.3)
    n_heads, n_channels = local_counts(structure, 0.3)
    assert n_heads + n_channels > 0
    for i in range(structure.n_layers):
        if i in structure.protected:
            assert plan.masks.heads[i].all() and plan.masks.channels[i].all()
            continue
        pruned_h = set((~plan.masks.heads[i]).nonzero().flatten().tolist())
        pruned_c = set((~plan.masks.channels[i]).nonzero().flatten().tolist())
        assert pruned_h == set(sorted(range(structure.n_heads), key=lambda h: heads[i, h].item())[:n_heads])
        assert pruned_c == set(sorted(range(structure.ffn), key=lambda j: channels[i, j].item())[:n_channels])


def test_local_and_global_rules_land_on_targets():
    model = tiny_model("mistral", layers=6)
    structure = describe(model)
    g = torch.Generator().manual_seed(0)
    heads = torch.rand(structure.n_layers, structure.n_heads, generator=g)
    channels = torch.rand(structure.n_layers, structure.ffn, generator=g)
    local_tol = len(structure.unprotected) * structure.channel_params / structure.decoder_params
    global_tol = max(structure.head_params, structure.channel_params) / structure.decoder_params
    previous = {"local": Masks.dense(structure), "global": Masks.dense(structure)}
    for target in (0.1, 0.25, 0.4, 0.55):
        for rule, plan_fn, tol in (("local", cut_local, local_tol), ("global", cut_global, global_tol)):
            plan = plan_fn(heads, channels, previous[rule], structure, target)
            assert abs(plan.sparsity - target) <= tol, (rule, target, plan.sparsity)
            assert plan.masks.is_nested_in(previous[rule])
            previous[rule] = plan.masks


def test_flap_bias_keeps_the_mean_output(family):
    """With FLAP's compensation, o_proj's output mean and (MLP-only pruning) the whole layer's output mean over the
    calibration tokens are those of the dense model."""
    model = tiny_model(family)
    structure = describe(model)
    layers = layer_modules(model, family_spec(model.config.model_type))
    ids, calib = calibration()
    spec = pruner_spec({"name": "flap", "score": "fluctuation", "ranking": "global", "bias_compensation": True})
    module = activation_pass(model, layers, structure, calib, spec)
    decoder = model.model.layers

    def means():
        out = {}
        handles = [layers[1].o.register_forward_hook(lambda m, a, y: out.setdefault("o", []).append(y)),
                   decoder[1].register_forward_hook(
                       lambda m, a, y: out.setdefault("layer", []).append(y[0] if isinstance(y, tuple) else y))]
        with torch.no_grad():
            model(input_ids=ids)
        for h in handles:
            h.remove()
        return {k: torch.cat(v).reshape(-1, structure.hidden).double().mean(0) for k, v in out.items()}

    dense = means()
    applier = MaskApplier(layers, structure)
    masks = Masks.dense(structure)
    masks.channels[1, ::2] = False  # half of layer 1's channels, nothing else
    applier.set(masks, flap_bias(layers, structure, masks, module.moments))
    torch.testing.assert_close(means()["layer"], dense["layer"], rtol=1e-4, atol=1e-5)
    applier.set(masks)  # without the compensation the mean moves: the check has teeth
    assert (means()["layer"] - dense["layer"]).abs().max() > 1e-3
    masks = Masks.dense(structure)
    masks.heads[1, :2] = False
    applier.set(masks, flap_bias(layers, structure, masks, module.moments))
    torch.testing.assert_close(means()["o"], dense["o"], rtol=1e-4, atol=1e-5)
    applier.remove()
    torch.testing.assert_close(means()["layer"], dense["layer"])  # remove() leaves the dense model


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    """Every method through the real pipeline on a tiny GQA model, three targets, no evaluation."""
    
    tmp = tmp_path_factory.mktemp("methods")
    runs = {}
    for pruner in PRUNERS:
        cfg = compose("config", *["model=tiny_mistral", "model.config.num_hidden_layers=6",
                                           "sparsity=[0.2,0.35,0.5]", "logger=none", "progress=false",
                                           "eval=none", f"pruner={pruner}", f"store_dir={tmp / 'store'}",
                                           f"cache_dir={tmp / 'cache'}", *SMOKE])
        runs[pruner] = (run(load_settings(cfg), run_dir=tmp / pruner), tmp / pruner)
    return runs


@pytest.mark.parametrize("pruner", PRUNERS)
def test_every_method_lands_on_its_targets(method_runs, pruner):
    results, run_dir = method_runs[pruner]
    traj = RunDir(run_dir).trajectory
    meta = traj.manifest["meta"]["structure"]
    per_structure = max(meta["head_params"], meta["channel_params"]) / meta["decoder_params"]
    local = results["method"]["ranking"] == "local"
    n_unprotected = meta["n_layers"] - len(meta["protected"])
    tol = n_unprotected * meta["channel_params"] / meta["decoder_params"] if local else per_structure
    assert results["method"]["pruner"] == pruner
    previous = None
    for key, entry in results["targets"].items():
        assert abs(entry["sparsity"] - float(key)) <= tol, (key, entry["sparsity"])
        masks = Masks.load(run_dir / entry["masks"])
        for i in meta["protected"]:
            assert masks.heads[i].all() and masks.channels[i].all()
        if previous is not None:
            assert masks.is_nested_in(previous)
        previous = masks
    if pruner == "gisp":
        assert traj.last_step > 3  # iterative: many scoring passes
    else:
        assert traj.last_step == 1  # one scoring: every level is cut from the stored scores
    biases = sorted((run_dir / "levels").glob("*.bias.safetensors"))
    assert len(biases) == (3 if pruner == "flap" else 0)


def test_flap_level_is_replayed_with_its_bias(method_runs, tmp_path):
    """gisp.evaluate restores a FLAP level as masks + bias: the same perplexity as the live model had."""
    from gisp.eval.perplexity import perplexity
    from gisp.runs import RunDir

    _, run_dir = method_runs["flap"]
    run_dir_ = RunDir(run_dir)
    live = run_dir_.load_model(tmp_path / "cache")
    model, applier, structure = live.model, live.applier, live.structure
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    level = run_dir_.level(target=0.5)  # the saved level: masks + bias
    assert level.bias is not None
    applier.set(level.masks)
    without = perplexity(model, ids, batch_size=2, progress=False)
    applier.set(level.masks, level.bias)
    with_bias = perplexity(model, ids, batch_size=2, progress=False)
    assert with_bias != pytest.approx(without)
    assert sparsity(level.masks, structure) == pytest.approx(read_json(run_dir / "results.json")
                                                             ["targets"]["0.5"]["sparsity"])
    again = run_dir_.level(target=0.37, live=live)  # a level never saved: read out, its bias from the stored means
    assert again.bias is not None and again.masks.is_nested_in(run_dir_.level(target=0.35).masks)


@pytest.mark.parametrize("overrides, match", [
    (["pruner=wanda_sp", "pruner.iterative=true"], "iterative=true is GISP"),
    (["pruner=oneshot", "pruner.bias_compensation=true"], "bias_compensation needs"),
    (["pruner=random", "pruner.ranking=sideways"], "unknown pruner.ranking"),
    (["pruner=random", "pruner.score=psychic"], "unknown pruner.score"),
])
def test_bad_pruner_config_fails_early(compose_cfg, tmp_path, overrides, match):
    with pytest.raises(GispError, match=match):
        run(load_settings(compose_cfg("model=tiny_mistral", "eval=none", *SMOKE, *overrides)), run_dir=tmp_path)
    assert not (tmp_path / "store").exists()


def test_flap_level_exports_with_its_bias(method_runs, tmp_path):
    """A FLAP level at 40% exports (o_proj / down_proj biases) and its compact model equals the masked model with
    the level's bias; the level's own layers without heads keep the attention bias as a constant."""
    from gisp.compact import GispDecoderForCausalLM
    from gisp.deploy import export_from_run
    from gisp.runs import RunDir

    _, run_dir = method_runs["flap"]
    out = export_from_run(run_dir, tmp_path / "out", sparsity=0.4, cache_dir=tmp_path / "cache")
    run = RunDir(run_dir)
    live = run.load_model(tmp_path / "cache")
    level = run.level(target=0.4, live=live)
    assert level.bias is not None and bool(level.bias.attn.abs().max() > 0)
    live.applier.set(level.masks, level.bias)
    compact = GispDecoderForCausalLM.from_pretrained(out).eval()
    assert compact.config.output_bias and (out / "gisp_output_bias.safetensors").is_file()
    ids = torch.randint(0, compact.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, live.model(ids).logits, rtol=1e-4, atol=1e-5)
        live.applier.set(level.masks)  # without the bias the masked model differs: the export carried it
        assert not torch.allclose(compact(ids).logits, live.model(ids).logits, rtol=1e-4, atol=1e-5)
