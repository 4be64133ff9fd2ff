"""Recovery losses computed in sequence chunks: the (tokens x vocabulary) logits never sit in memory whole.

Both losses start from the final hidden states (B, T, d). Position t predicts token t + 1; positions whose next label
is -100 (prompts, padding) are not scored. The output head is applied to one chunk of positions at a time, and the
chunk's loss AND its gradient are computed right there (the gradient of a softmax loss with respect to the logits
is known in closed form: p - onehot for the cross-entropy, T (p_student - p_teacher) for the tempered KL), then the
chunk's logits are dropped. Backward only scales the stored gradients: no logits are kept or computed again, so at
most one chunk's logits (chunk x V floats, for the student and the teacher) exist at a time, at the cost of one
head product per chunk for the hidden-state gradient (and one for the head's own, when it trains).
"""

from __future__ import annotations

import torch
from torch import nn


def _flat(h: torch.Tensor) -> torch.Tensor:
    return h.reshape(-1, h.shape[-1])  # (B * c, d): one contiguous matrix product, not a batched one


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over scored positions of  kl_weight * T^2 KL(p_t || p_s)  +  ce_weight * CE(z_s, y), p = softmax(z / T)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher_hidden, teacher_weight, teacher_bias, chunk, temperature,
                kl_weight, ce_weight):
        B, T1, d = hidden.shape
        need = ctx.needs_input_grad  # (validation, no_grad: the loss only)
        grad_hidden = torch.zeros_like(hidden) if need[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and need[2] else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, T1, chunk):
            part = slice(start, start + chunk)
            h = _flat(hidden[:, part])  # (n, d)
            y = labels[:, part].reshape(-1)  # (n,)
            scored = (y != -100).to(torch.float32)[:, None]  # (n, 1)
            z = torch.nn.functional.linear(h, weight, bias).float()  # (n, V)
            grad = None  # d loss / d z, built in place (no (n, V) temporaries beyond the logits' own)
            if kl_weight:
                zt = torch.nn.functional.linear(_flat(teacher_hidden[:, part]), teacher_weight, teacher_bias).float()
                log_pt = (zt / temperature).log_softmax(-1)
                del zt
                log_ps = (z / temperature).log_softmax(-1)
                pt = log_pt.exp()
                total += kl_weight * temperature**2 * ((pt * (log_pt - log_ps)).sum(-1) * scored[:, 0]).sum().double()
                del log_pt
                grad = log_ps.exp_().sub_(pt).mul_(kl_weight * temperature * scored)  # T (p_s - p_t)
                del pt
            if ce_weight:
                log_p = z.log_softmax(-1)
                safe = y.clamp(min=0)[:, None]
                total += ce_weight * (-(log_p.gather(1, safe)[:, 0] * scored[:, 0]).sum()).double()
                g = log_p.exp_()
                g.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=g.dtype))  # p - onehot
                g.mul_(ce_weight * scored)
                grad = g if grad is None else grad.add_(g)
                del log_p, g
            if grad is None or (grad_hidden is None and grad_weight is None):
                continue
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[:, part] = (grad @ weight).view(B, -1, d)
            if grad_weight is not None:
                grad_weight += grad.float().t() @ h.float()
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
            del z, grad
        empty = torch.empty(0)
        ctx.save_for_backward(*(g if g is not None else empty for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtype = hidden.dtype
        return total.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        grads = [(g * grad_out).to(ctx.dtype) if has else None for g, has in zip(ctx.saved_tensors, ctx.has)]
        return *grads, *([None] * 8)


def _head(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return module.weight, getattr(module, "bias", None)


def head_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int,
              teacher_hidden: torch.Tensor | None = None, teacher_head: nn.Module | None = None,
              temperature: float = 1.0, kl_weight: float = 0.0, ce_weight: float = 1.0) -> tuple[torch.Tensor, int]:
    """(summed loss over the scored positions, number of scored positions): `ce_weight` x next-token cross-entropy
    + `kl_weight` x temperature^2 x KL(teacher || student) of the softened next-token distributions (the teacher's
    hidden states carry no graph)."""
    y = labels[:, 1:]
    weight, bias = _head(head)
    t_hidden, t_weight, t_bias = None, None, None
    if kl_weight:
        t_weight, t_bias = (p.detach() if p is not None else None for p in _head(teacher_head))
        t_hidden = teacher_hidden[:, :-1].detach()
    total = _ChunkedHeadLoss.apply(hidden[:, :-1], weight, bias, y, t_hidden, t_weight, t_bias, chunk,
                                   float(temperature), float(kl_weight), float(ce_weight))
    return total, int((y != -100).sum())


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int
                          ) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy over the scored positions, number of scored positions)."""
    return head_loss(hidden, head, labels, chunk)


def chunked_kl(student_hidden: torch.Tensor, student_head: nn.Module, teacher_hidden: torch.Tensor,
               teacher_head: nn.Module, labels: torch.Tensor, chunk: int, temperature: float = 1.0
               ) -> tuple[torch.Tensor, int]:
    """(summed KL(teacher || student) x temperature^2 over the scored positions, as in Hinton et al., number of
    scored positions)."""
    return head_loss(student_hidden, student_head, labels, chunk, teacher_hidden, teacher_head, temperature,
                     kl_weight=1.0, ce_weight=0.0)
