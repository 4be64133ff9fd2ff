"""Fully sharded scoring (trainer=fsdp: FSDP2 through Lightning's ModelParallelStrategy) on 2 CPU processes (gloo):
the same scores and masks as one process, scores from uneven local shards, and clear refusals where it cannot run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from conftest import REPO, SMOKE, tiny_model

from gisp.config import load_settings
from gisp.errors import GispError
from gisp.lightning.datamodule import PaddedDataset, ShardSampler
from gisp.lightning.sharding import partial_layer_scores
from gisp.models.families import family_spec
from gisp.models.structure import describe, layer_modules
from gisp.pipeline import run
from gisp.prune.importance import layer_scores, scored_weights, structure_scores
from gisp.prune.objectives import sequence_nll
from gisp.runs import RunDir


def _grads(model, structure, ids):
    layers = layer_modules(model, family_spec(model.config.model_type))
    model.requires_grad_(False)
    for i in structure.unprotected:
        for p in scored_weights(layers[i], structure):
            p.requires_grad_(True)
    sequence_nll(model, ids).mean().backward()
    return layers


def test_partial_scores_of_a_whole_model_are_the_layer_scores(family):
    model = tiny_model(family)
    structure = describe(model)
    layers = _grads(model, structure, torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0)))
    for i in structure.unprotected:
        for mine, ref in zip(partial_layer_scores(layers[i], structure, lambda w: w.grad),
                             layer_scores(layers[i], structure)):
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=0)


def _sharded_worker(rank: int, world: int, init: str, out: str) -> None:
    """One process of a 2-process gloo group: shard a tiny model (uneven rows: F = 99), run this rank's half of the
    batch, score from the shards; saves the scores."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    from gisp.lightning.sharding import shard_model, sharded_scores

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_uneven_config())
        structure = describe(model)
        layers = layer_modules(model, family_spec("llama"))
        model.requires_grad_(False)
        for i in structure.unprotected:
            for p in scored_weights(layers[i], structure):
                p.requires_grad_(True)
        shard_model(model, "model.layers", init_device_mesh("cpu", (world,)))
        ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
        (sequence_nll(model, ids[rank::world]).sum() / 4).backward()  # this rank's share of the mean loss

        def all_reduce(t):
            dist.all_reduce(t)
            return t

        scores = sharded_scores(layers, structure, "none", lambda w: w.grad, all_reduce, torch.device("cpu"))
        torch.save(scores, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _uneven_config():
    import transformers

    return transformers.AutoConfig.for_model("llama", hidden_size=64, intermediate_size=99, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=4, vocab_size=300)


@pytest.mark.e2e
def test_sharded_scores_from_uneven_shards_equal_one_process(tmp_path):
    torch.manual_seed(0)
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(_uneven_config())
    structure = describe(model)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    layers = _grads(model, structure, ids)
    ref = structure_scores(layers, structure, "none")
    out = str(tmp_path / "scores")
    mp.start_processes(_sharded_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2,
                       start_method="spawn", join=True)
    for rank in range(2):
        heads, channels = torch.load(f"{out}.{rank}", weights_only=True)
        torch.testing.assert_close(heads, ref[0], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(channels, ref[1], rtol=1e-5, atol=1e-12)


def test_equal_batches_under_fsdp_pad_with_weightless_items():
    """9 sequences, batch 4, 2 processes: 5 and 4 sequences, 2 batches each; the padding item has weight 0."""
    shards = [ShardSampler(9, r, 2, equal_batches=4).indices for r in range(2)]
    assert shards == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    assert ShardSampler(9, 1, 2).indices == [1, 3, 5, 7]  # DDP: no padding

    class Items:
        def __len__(self):
            return 9

        def __getitem__(self, i):
            return {"input_ids": torch.tensor([i]), "labels": torch.tensor([i]), "weight": torch.tensor(1 / 9)}

    pad = PaddedDataset(Items())[9]
    assert pad["real"] is False and float(pad["weight"]) == 0.0


def fsdp_run(tmp_path, model: str, *extra: str) -> subprocess.CompletedProcess:
    """As users run it: progress bars and the wandb logger (offline) on."""
    args = [sys.executable, "-m", "gisp.run", f"model={model}", "sparsity=0.3", "trainer=fsdp",
            "trainer.accelerator=cpu", "trainer.devices=2", "threads=1",
            f"cache_dir={tmp_path / 'cache'}", f"store_dir={tmp_path / 'fsdp_store'}",
            f"hydra.run.dir={tmp_path / 'fsdp'}", *SMOKE, *extra]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.e2e
def test_fsdp_two_cpu_processes_give_the_single_process_masks(compose_cfg, tmp_path):
    """9 calibration sequences over 2 processes (one padding item). Evaluation over the processes: the README's FSDP
    command in tests/test_readme_commands.py."""
    extra = ["data.n_samples=9", "eval=none"]
    single = run(load_settings(compose_cfg(*SMOKE, "model=tiny_llama", "sparsity=0.3", *extra)),
                 run_dir=tmp_path / "single")
    proc = fsdp_run(tmp_path, "tiny_llama", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 1" in log and "sharded 4" in log
    # rank 1 read no weights: an empty model on the meta device, its shards broadcast from rank 0
    assert "rank 1: model built on the meta device" in log and "received from rank 0" in log
    a, b = RunDir(tmp_path / "single").trajectory, RunDir(tmp_path / "fsdp").trajectory
    assert a.id == b.id == single["trajectory"]["id"]
    assert [s["step"] for s in a.steps] == [s["step"] for s in b.steps] and len(a.steps) > 3
    for step in a.steps:
        ma, mb = a.masks_at(step["step"]), b.masks_at(step["step"])
        assert ma.heads.equal(mb.heads) and ma.channels.equal(mb.channels), step
    assert b.steps[0]["calib_loss"] == pytest.approx(a.steps[0]["calib_loss"], rel=1e-6)


def test_fsdp_refusals(compose_cfg):
    load_settings(compose_cfg(*SMOKE, "trainer=fsdp"))  # perplexity: evaluated over the processes
    with pytest.raises(GispError, match="whole model in one process"):
        load_settings(compose_cfg(*SMOKE, "trainer=fsdp", "eval=cmqa"))
    settings = load_settings(compose_cfg(*SMOKE, "trainer=fsdp", "eval=none", "pruner=wanda_sp"))
    from gisp.lightning.scoring import PASSES

    model = tiny_model("mistral")
    structure = describe(model)
    module = PASSES["activations"](model, layer_modules(model, family_spec("mistral")), structure, 8, settings.pruner)
    module._device_mesh = object()  # as ModelParallelStrategy sets it
    with pytest.raises(GispError, match="trainer=ddp"):
        module.configure_model()
