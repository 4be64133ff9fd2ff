"""SlimGPT (structured OBS) against oracles: a removal's update is the least-squares refit of the remaining columns and
its error the loss it adds (torch.linalg.lstsq on the inputs), the Schur downdate is the inverse Hessian of what
remains, the greedy picks the cheapest group; the per-layer counts land on the target; on a tiny model the level's
update beats the plain masks and the weights are left as they were; through gisp.run its levels are separate
(not nested) steps of the trajectory, reused, refused when not computed, and combined with a reconstruction refused."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import SMOKE, compose, tiny_model
from transformers import AutoModelForCausalLM

from gisp.compact.slicing import compact_model
from gisp.config import load_settings
from gisp.deploy import evaluate_run, export_from_run
from gisp.errors import GispError
from gisp.models.families import family_spec, get_submodule
from gisp.models.structure import describe, layer_modules
from gisp.pipeline import run
from gisp.prune.masks import MaskApplier, sparsity
from gisp.reconstruct.build import Reconstruction, installed
from gisp.reconstruct.obs import block_errors, channel_group_sizes, inverse_hessian, prune_groups, remove
from gisp.reconstruct.slimgpt import layer_ratios, level_counts, slimgpt_level
from gisp.runs import RunDir


def _problem(n=400, c=12, out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) @ torch.randn(c, c, generator=g, dtype=torch.float64)
    w = torch.randn(out, c, generator=g, dtype=torch.float64)
    return x, w


def test_removal_is_the_least_squares_refit_and_its_error_the_added_loss():
    x, w = _problem()
    n = x.shape[0]
    hinv = torch.linalg.inv(x.t() @ x / n)
    removed = torch.tensor([2, 5, 7])
    kept = torch.tensor([i for i in range(x.shape[1]) if i not in removed.tolist()])
    err = float(block_errors(w, hinv, removed[None])[0])
    updated, h = w.clone(), hinv.clone()
    remove(updated, h, removed)
    oracle = torch.linalg.lstsq(x[:, kept], x @ w.t()).solution.t()  # the best kept columns for the dense output
    torch.testing.assert_close(updated[:, kept], oracle, rtol=1e-8, atol=1e-9)
    assert torch.equal(updated[:, removed], torch.zeros(w.shape[0], 3, dtype=w.dtype))
    added = float((x[:, kept] @ updated[:, kept].t() - x @ w.t()).pow(2).sum() / n)
    assert err == pytest.approx(added, rel=1e-8)
    # the downdated inverse is the inverse Hessian of the remaining inputs
    torch.testing.assert_close(h[kept[:, None], kept[None, :]],
                               torch.linalg.inv((x[:, kept].t() @ x[:, kept]) / n), rtol=1e-8, atol=1e-10)


def test_greedy_picks_the_cheapest_group_and_the_sizes_shrink():
    x, w = _problem(c=12)
    hinv = torch.linalg.inv(x.t() @ x / x.shape[0])
    groups = torch.arange(12).reshape(4, 3)
    errors = block_errors(w, hinv, groups)
    first = prune_groups(w.clone(), hinv.clone(), groups, 1)
    assert first == [int(torch.argmin(errors))]
    assert len(set(prune_groups(w.clone(), hinv.clone(), groups, 3))) == 3
    assert channel_group_sizes(700) == [94, 64, 64, 64, 64, 64, 64, 64, 64, 64, 30]
    assert sum(channel_group_sizes(3000)) == 3000 and max(channel_group_sizes(5000)) == 1024
    dead = torch.zeros(4, 4)
    dead[0, 0] = dead[1, 1] = 1.0
    assert torch.isfinite(inverse_hessian(dead, 1, 0.01)).all()  # inputs that never fire: H_jj = 1


def test_counts_land_on_the_target_with_log_increasing_ratios():
    structure = describe(tiny_model("llama", layers=8), first_fraction=0.25, last=1)
    ratios = layer_ratios(5, 0.4, 0.25)
    assert ratios[0] == pytest.approx(0.1) and ratios[-1] == pytest.approx(0.4)
    assert all(a < b for a, b in itertools.pairwise(ratios))
    for target in (0.2, 0.35, 0.5):
        counts = level_counts(structure, target, 0.25)
        assert set(counts) == set(structure.unprotected)
        pruned = sum(h * structure.head_params + c * structure.channel_params for h, c in counts.values())
        assert abs(pruned / structure.decoder_params - target) <= structure.channel_params / structure.decoder_params
        channels = [counts[i][1] for i in sorted(counts)]
        assert channels[0] < channels[-1]


@pytest.mark.parametrize("family, gqa_mode", [("llama", "query"), ("mistral", "query"), ("mistral", "group")])
def test_level_beats_its_plain_masks_and_leaves_the_weights(family, gqa_mode):
    model = tiny_model(family, layers=4)
    structure = describe(model, protected=(3,), gqa_mode=gqa_mode)
    layers = layer_modules(model, family_spec(model.config.model_type))
    decoder = get_submodule(model, family_spec(model.config.model_type).layers)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 300, (4, 32), generator=g)} for _ in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks, weights = slimgpt_level(model, decoder, layers, structure, batches, 0.3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert abs(sparsity(masks, structure) - 0.3) < 0.05 and masks.heads[3].all() and masks.channels[3].all()
    if gqa_mode == "group":  # whole KV groups
        assert all(len(set(masks.heads[i].reshape(2, 2).sum(1).tolist()) - {0, 2}) == 0 for i in range(3))
    x = torch.cat([b["input_ids"] for b in batches])
    with torch.no_grad():
        dense = model(x).logits
        applier = MaskApplier(layers, structure)
        applier.set(masks)
        plain = model(x).logits
        with installed(layers, structure, masks, Reconstruction(weights)):
            updated = model(x).logits
        applier.remove()
        torch.testing.assert_close(compact_model(model, masks, structure, None, weights)(x).logits, updated,
                                   rtol=1e-4, atol=1e-5)
    assert (updated - dense).pow(2).mean() < (plain - dense).pow(2).mean()


def test_through_gisp_run_levels_are_separate_reused_and_refused_when_missing(tmp_path):
    def cfg(*extra):
        return compose("config", "logger=none", "progress=false", f"cache_dir={tmp_path / 'cache'}",
                       f"store_dir={tmp_path / 'store'}", *SMOKE, "pruner=slimgpt", *extra)

    first = run(load_settings(cfg("sparsity=[0.2,0.4]")), run_dir=tmp_path / "a")
    traj = RunDir(tmp_path / "a").trajectory
    assert [s["kind"] for s in traj.steps] == ["level", "level"] and first["trajectory"]["computed_steps"] == [1, 2]
    traj.verify()  # separate levels are not nested, and need not be
    for key, entry in first["targets"].items():
        assert abs(entry["sparsity"] - float(key)) < 0.02 and entry["metrics"]["wikitext2_ppl"] > 1
    more = run(load_settings(cfg("sparsity=[0.2,0.3]")), run_dir=tmp_path / "b")
    assert more["trajectory"]["computed_steps"] == [3] and more["targets"]["0.2"]["metrics"] == \
        first["targets"]["0.2"]["metrics"]
    with pytest.raises(GispError, match=r"(?s)not computed.*not nested.*sparsity=\[...,0.35\]"):
        evaluate_run(tmp_path / "a", sparsity=[0.35], cache_dir=tmp_path / "cache")
    with pytest.raises(GispError, match="slimgpt updates the remaining weights itself"):
        load_settings(cfg("reconstruct=lsq"))
    # the level a command reads is the stored one: masks and weights, the same model every time
    live = RunDir(tmp_path / "a").load_model(tmp_path / "cache")
    level = RunDir(tmp_path / "a").level(target=0.4, live=live)
    assert level.weights and level.step == 2
    # its export is the model gisp evaluated: the level's masks and SlimGPT's updated columns
    out = export_from_run(tmp_path / "a", tmp_path / "hf", sparsity=0.4, cache_dir=tmp_path / "cache")
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    x = torch.randint(3, live.model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), live.at(level) as model:
        torch.testing.assert_close(exported(x).logits, model(x).logits, rtol=1e-4, atol=1e-5)
