"""The global plan prunes exactly the lowest-scored structures, deterministically, nested, never protected ones."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_model

from gisp.models.structure import describe, protected_layers
from gisp.prune.masks import Masks, sparsity
from gisp.prune.ranking import cut_step
from gisp.prune.schedule import structural_ratios, structures_to_prune


@pytest.fixture
def structure():
    return describe(tiny_model("mistral"))


def random_scores(structure, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(structure.n_layers, structure.n_heads, generator=g)
    channels = torch.rand(structure.n_layers, structure.ffn, generator=g)
    for i in structure.protected:
        heads[i], channels[i] = float("inf"), float("inf")
    return heads, channels


def test_prunes_exactly_the_lowest(structure):
    heads, channels = random_scores(structure)
    n = 100
    plan = cut_step(heads, channels, Masks.dense(structure), structure, n)
    flat = torch.cat([heads.flatten(), channels.flatten()])
    threshold = torch.sort(flat).values[n - 1]
    pruned = plan.masks.flat_pruned()
    assert int(pruned.sum()) == n
    assert bool((flat[pruned] <= threshold).all()) and bool((flat[~pruned] >= threshold).all())
    assert plan.masks.heads[list(structure.protected)].all() and plan.masks.channels[list(structure.protected)].all()
    assert plan.sparsity == pytest.approx(sparsity(plan.masks, structure))


def test_ties_break_by_index_and_pruned_stay_pruned(structure):
    heads = torch.zeros(structure.n_layers, structure.n_heads)
    channels = torch.zeros(structure.n_layers, structure.ffn)
    for i in structure.protected:
        heads[i], channels[i] = float("inf"), float("inf")
    first = cut_step(heads, channels, Masks.dense(structure), structure, 10)
    # all ties: the first 10 indices in (all heads, then all channels) order
    assert int((~first.masks.heads).sum()) == 10 and (~first.masks.heads.flatten()[:10]).all()
    # the already pruned structures now score HIGHEST: they must stay pruned anyway (nested masks)
    heads2 = torch.where(first.masks.heads, torch.rand_like(heads), torch.full_like(heads, 100.0))
    heads2[list(structure.protected)] = float("inf")
    second = cut_step(heads2, channels, first.masks, structure, 30)
    assert second.masks.is_nested_in(first.masks) and second.masks.n_pruned == 30
    assert cut_step(heads, channels, Masks.dense(structure), structure, 10).masks.heads.equal(first.masks.heads)


def test_cap_lands_on_target(structure):
    heads, channels = random_scores(structure, seed=3)
    plan = cut_step(heads, channels, Masks.dense(structure), structure, 10_000, cap=0.3)
    assert plan.landed_target == 0.3
    assert abs(plan.sparsity - 0.3) <= structure.head_params / structure.decoder_params / 2 + 1e-12
    below = cut_step(heads, channels, Masks.dense(structure), structure, 5, cap=0.3)
    assert below.landed_target is None and below.masks.n_pruned == 5


def test_protected_layers_rule():
    assert protected_layers(32) == (0, 1, 2, 31)
    assert protected_layers(30) == (0, 1, 2, 29)
    assert protected_layers(4) == (3,)
    assert protected_layers(10, explicit=[5, 1]) == (1, 5)


def test_schedules():
    lin = structural_ratios("linear", 111, 0.7)
    reference = [(k - 1) / 111 * 0.7 for k in range(1, 113)]  # the reference's n = 112, dense first step
    assert lin == pytest.approx(reference[1:])
    for kind in ("linear", "cosine", "exponential"):
        r = structural_ratios(kind, 10, 0.7)
        assert r[-1] == pytest.approx(0.7) and all(b > a for a, b in itertools.pairwise(r))
    assert structures_to_prune(0.7, 10) == 7
