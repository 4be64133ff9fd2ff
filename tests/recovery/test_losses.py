"""The chunked recovery losses equal the plain computation over the full logits (values and gradients), and keep
no (tokens x vocabulary) tensor for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import saved_tensor_bytes

from gisp.recovery.losses import chunked_cross_entropy, chunked_kl, head_loss

B, T, D, V = 3, 17, 8, 50


def _inputs(seed: int = 0, bias: bool = True):
    torch.manual_seed(seed)
    hidden = torch.randn(B, T, D, requires_grad=True)
    head = torch.nn.Linear(D, V, bias=bias)
    labels = torch.randint(0, V, (B, T))
    labels[0, :5] = -100  # a prompt: not scored
    labels[2, -3:] = -100  # padding
    return hidden, head, labels


def _grads(loss, hidden, head):
    hidden.grad = None
    head.zero_grad()
    loss.backward()
    return hidden.grad.clone(), head.weight.grad.clone(), None if head.bias is None else head.bias.grad.clone()


@pytest.mark.parametrize("chunk", [1, 4, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_cross_entropy_equals_the_full_logits(chunk, bias):
    hidden, head, labels = _inputs(bias=bias)
    got, n = chunked_cross_entropy(hidden, head, labels, chunk)
    got_grads = _grads(got, hidden, head)
    want = F.cross_entropy(head(hidden)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")
    want_grads = _grads(want, hidden, head)
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 100])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_equals_the_full_kl(chunk, temperature):
    hidden, head, labels = _inputs()
    teacher_hidden, teacher_head = torch.randn(B, T, D), torch.nn.Linear(D, V)
    got, _ = chunked_kl(hidden, head, teacher_hidden, teacher_head, labels, chunk, temperature)
    got_grads = _grads(got, hidden, head)
    log_ps = (head(hidden)[:, :-1] / temperature).log_softmax(-1)
    log_pt = (teacher_head(teacher_hidden)[:, :-1] / temperature).log_softmax(-1).detach()
    scored = (labels[:, 1:] != -100).float()
    want = ((log_pt.exp() * (log_pt - log_ps)).sum(-1) * scored).sum() * temperature**2
    want_grads = _grads(want, hidden, head)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert teacher_head.weight.grad is None  # the teacher never trains


def test_kl_plus_cross_entropy_is_their_weighted_sum():
    hidden, head, labels = _inputs()
    teacher_hidden, teacher_head = torch.randn(B, T, D), torch.nn.Linear(D, V)
    both, _ = head_loss(hidden, head, labels, 4, teacher_hidden, teacher_head, 2.0, kl_weight=1.0, ce_weight=0.3)
    kl, _ = chunked_kl(hidden, head, teacher_hidden, teacher_head, labels, 4, 2.0)
    ce, _ = chunked_cross_entropy(hidden, head, labels, 4)
    torch.testing.assert_close(both, kl + 0.3 * ce)


def test_no_token_by_vocabulary_tensor_is_kept_for_backward():
    """What autograd keeps for the loss is the hidden states' size, not the logits' (B x T x V floats)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 64, 16, requires_grad=True)
    head = torch.nn.Linear(16, 4096, bias=False).requires_grad_(False)  # a frozen head (LoRA students)
    labels = torch.randint(0, 4096, (2, 64))
    logits_bytes = 2 * 64 * 4096 * 4
    kept = saved_tensor_bytes(head, lambda: chunked_cross_entropy(hidden, head, labels, 16))
    full = saved_tensor_bytes(head, lambda: F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten()))
    assert full >= logits_bytes and kept <= 2 * 64 * 16 * 4 < logits_bytes / 100
