"""Perplexity of the live (possibly masked) model on fixed, pre-tokenized evaluation windows; over several
processes each one scores its share of the windows and the summed log-likelihoods are reduced."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gisp.data.sources import TextSource
from gisp.errors import GispError


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "wikitext2 ppl",
    rank: int = 0,
    world_size: int = 1,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    lockstep: bool = False,
    with_stderr: bool = False,
) -> float | tuple[float, float]:
    """exp(total next-token NLL / total predicted tokens) over ``windows`` (n_windows, seq_len); with
    ``with_stderr``, also its standard error over the windows: ppl x std(window mean NLL) / sqrt(n_windows) (the
    delta method; windows of equal length, so the perplexity is exp of the mean of the window means).

    Each window is scored on its own (no context carried over): seq_len - 1 predicted positions, CE in float32.
    Since all windows have the same length this equals SparseGPT/Wanda's exp(mean of per-window mean losses);
    summing first keeps it exact whatever ``batch_size`` is.

    Several processes (DDP, FSDP): process ``rank`` of ``world_size`` scores windows rank::world_size only and
    ``reduce_fn`` sums the (NLL, tokens) pair over the processes (e.g. ``lambda t: strategy.reduce(t, reduce_op=
    "sum")``), so every process returns the single-process perplexity. ``lockstep`` (FSDP, where every forward is a
    collective): every process runs the same number of forward calls; the extra ones are not counted.
    """
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise GispError(
            f"no evaluation windows (shape {tuple(windows.shape)}): text shorter than one window of seq_len "
            f"tokens; use a longer text or a smaller seq_len"
        )
    if windows.shape[1] < 2:
        raise GispError(f"evaluation windows of {windows.shape[1]} token(s) predict nothing; use seq_len >= 2")
    if batch_size < 1:
        raise GispError(f"evaluation batch_size must be >= 1, got {batch_size}")
    if world_size > 1 and reduce_fn is None:
        raise GispError("perplexity over several processes needs reduce_fn (a sum over the processes)")
    share = windows[rank::world_size]  # (n_r, seq_len)
    n_batches = None
    if lockstep and world_size > 1:
        n_batches = math.ceil(math.ceil(windows.shape[0] / world_size) / batch_size)
    window_means: list[float] = []
    total_nll, total_tokens = nll_sum(model, share, batch_size, device, progress, desc, n_batches, spare=windows[:1],
                                      window_means=window_means)
    sums = [total_nll, total_tokens, sum(window_means), sum(m * m for m in window_means), len(window_means)]
    if world_size > 1:
        sums = reduce_fn(torch.tensor(sums, dtype=torch.float64)).tolist()
    total_nll, total_tokens, s1, s2, n = sums
    ppl = math.exp(total_nll / total_tokens)
    if not with_stderr:
        return ppl
    variance = max(s2 / n - (s1 / n) ** 2, 0.0) * n / max(n - 1, 1)  # of the window means (sample variance)
    return ppl, ppl * math.sqrt(variance / n)


@torch.no_grad()
def nll_sum(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device | str | None = None,
            progress: bool = True, desc: str = "ppl", n_batches: int | None = None,
            spare: torch.Tensor | None = None, window_means: list[float] | None = None) -> tuple[float, int]:
    """Summed next-token NLL and number of predicted tokens over ``windows`` (n, seq_len), in batches. With
    ``n_batches``, exactly that many forward calls run: the missing ones score ``spare`` (or the last window) and are
    not counted. ``window_means`` receives each counted window's mean NLL."""
    device = torch.device(device) if device is not None else _model_device(model)
    config = getattr(model, "config", None)
    kwargs: dict[str, Any] = {"use_cache": False} if hasattr(config, "use_cache") else {}
    batches = [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]
    counted = len(batches)
    if n_batches is not None:
        filler = windows[-1:] if windows.shape[0] else spare
        batches += [filler] * (n_batches - len(batches))
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        for b, chunk in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
            ids = chunk.to(device)  # (b, seq_len)
            logits = model(ids, **kwargs).logits  # (b, seq_len, vocab)
            if b >= counted:
                continue
            pred = logits[:, :-1, :].float()  # (b, seq_len-1, vocab)
            target = ids[:, 1:]  # (b, seq_len-1)
            nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
            nll = nll.view(target.shape)  # (b, seq_len-1)
            total_nll += float(nll.sum())
            total_tokens += target.numel()
            if window_means is not None:
                window_means += nll.double().mean(dim=1).tolist()
    finally:
        model.train(was_training)
    return total_nll, total_tokens


@dataclass(frozen=True)
class PerplexityTask:
    """One perplexity metric: a text, a window length and how much of it to use."""

    metric: str  # e.g. "wikitext2_ppl" (ctx 128)
    source: TextSource
    seq_len: int = 128
    max_windows: int | None = None  # None: all windows (the paper's protocol); an int: a faster subset
    batch_size: int = 8
    variant: str = ""  # the dataset variant in words, written next to the number (e.g. "wikitext-2-raw-v1 test")
