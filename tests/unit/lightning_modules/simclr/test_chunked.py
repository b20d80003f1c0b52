"""Chunked NT-Xent (gradient caching via activation checkpointing): the same loss and
gradients as one big batch, BatchNorm running statistics updated once."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_modules.simclr.chunked import chunked_forward
from lightning_modules.simclr.lightning_model import SimCLRModule


def _module(chunk_size):
    torch.manual_seed(0)
    return SimCLRModule(patch_size=16, backbone="resnet18", proj_hidden_dim=32, proj_out_dim=16,
                        optimizer="adam", lr=1e-3, chunk_size=chunk_size)


def _views(b=6):
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, 1, 16, 16, generator=g), torch.rand(b, 1, 16, 16, generator=g)


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_chunked_loss_and_gradients_equal_the_big_batch(chunk):
    """BatchNorm in eval mode (each sample's embedding independent of its batch): chunked and
    unchunked give the same NT-Xent and the same gradient on every parameter (1e-5)."""
    x0, x1 = _views()
    grads, losses = [], []
    for c in (None, chunk):
        m = _module(c).eval()
        *_, loss = m.forward_views(x0, x1)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


def test_chunking_changes_nothing_without_a_graph_and_bn_stats_update_once():
    x0, x1 = _views()
    m = _module(4).train()
    ref = copy.deepcopy(m)
    *_, loss = m.forward_views(x0, x1)
    loss.backward()  # re-runs each chunk: must not update running stats again
    with torch.no_grad():  # the chunks' forwards alone, in the same order
        for xc in torch.cat([x0, x1]).split(4):
            ref.model(xc)
    bn = [(n, b) for n, b in m.named_buffers() if "running_mean" in n]
    assert bn
    ref_buffers = dict(ref.named_buffers())
    for n, b in bn:
        torch.testing.assert_close(b, ref_buffers[n], msg=n)
    with torch.no_grad():  # no graph: plain forward, chunking irrelevant
        lin = nn.Linear(3, 2)
        x = torch.randn(7, 3)
        torch.testing.assert_close(chunked_forward(lin, x, 2), lin(x))
