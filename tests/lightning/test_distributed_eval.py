"""Perplexity over 2 processes (gloo): each process scores only its share of the windows, the summed
log-likelihoods are reduced, and every process gets the single-process perplexity."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_model

from gisp.errors import GispError
from gisp.eval.perplexity import perplexity


class CountingModel(torch.nn.Module):
    """Wraps a causal LM; counts the windows it scores (the rows of every forward)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.rows, self.calls = model, model.config, 0, 0

    def forward(self, ids, **kwargs):
        self.rows += ids.shape[0]
        self.calls += 1
        return self.model(ids, **kwargs)


def windows(n: int) -> torch.Tensor:
    return torch.randint(0, 300, (n, 16), generator=torch.Generator().manual_seed(4))  # (n, T)


def _worker(rank: int, world: int, init: str, out: str, n: int, lockstep: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = CountingModel(tiny_model("llama"))

        def reduce_fn(t):
            dist.all_reduce(t)
            return t

        ppl = perplexity(model, windows(n), batch_size=2, progress=False, rank=rank, world_size=world,
                         reduce_fn=reduce_fn, lockstep=lockstep)
        torch.save({"ppl": ppl, "rows": model.rows, "calls": model.calls}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
@pytest.mark.parametrize("n,lockstep", [(10, False), (9, True)], ids=["ddp-10", "fsdp-lockstep-9"])
def test_two_processes_give_the_single_process_perplexity(tmp_path, n, lockstep):
    single = CountingModel(tiny_model("llama"))
    reference = perplexity(single, windows(n), batch_size=2, progress=False)
    assert single.rows == n
    out = str(tmp_path / "ppl")
    mp.start_processes(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", out, n, lockstep), nprocs=2,
                       start_method="spawn", join=True)
    results = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    for r in results:
        assert r["ppl"] == pytest.approx(reference, rel=1e-6)
    shares = [len(range(r, n, 2)) for r in range(2)]  # 5 + 5, or 5 + 4
    if lockstep:  # every process runs the same number of forwards; the extra one (rank 1) is not counted
        assert results[0]["calls"] == results[1]["calls"] == 3
        assert results[0]["rows"] == shares[0] and results[1]["rows"] == shares[1] + 1
    else:
        assert [r["rows"] for r in results] == shares


def test_several_processes_need_a_reduction():
    with pytest.raises(GispError, match="reduce_fn"):
        perplexity(tiny_model("llama"), windows(4), batch_size=2, progress=False, rank=0, world_size=2)
