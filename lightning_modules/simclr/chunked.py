"""Exact NT-Xent over a large batch in bounded memory: "gradient caching" (Gao, Zhang, Han,
Callan, RepL4NLP 2021, https://arxiv.org/abs/2101.06983) through torch's activation
checkpointing.

NT-Xent needs every negative at once, so gradient accumulation over small batches optimises a
different loss. Gradient caching keeps the loss exact: (1) compute every embedding without a
graph, (2) take the loss over all of them and its gradient w.r.t. the embeddings, (3) re-run
each chunk with a graph and back-propagate that chunk's part of the gradient. Non-reentrant
``torch.utils.checkpoint`` per chunk does exactly these steps: the forward keeps only each
chunk's input, the loss sees the concatenated embeddings of the whole batch (and, under DDP,
lightly's gathered negatives of every rank, unchanged), and the backward re-runs one chunk at
a time when autograd reaches it. Activation memory is set by the chunk, not the batch.

Exact means: loss and gradients equal those of one big batch for an encoder whose output for a
sample does not depend on the other samples of its batch (tested to 1e-5 with BatchNorm in eval
mode). In training mode BatchNorm normalises with the statistics of each chunk -- as per-device
BatchNorm does under DDP without ``sync_batchnorm`` -- and the re-run does not update the
running statistics a second time (its momentum is 0 during the re-run).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _frozen_batchnorm_stats(model: nn.Module):
    """BatchNorm running statistics unchanged inside (momentum 0: running = 1*running)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None
              else None) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _contexts(model: nn.Module):
    return contextlib.nullcontext(), _frozen_batchnorm_stats(model)


def chunked_forward(model: nn.Module, x: torch.Tensor, chunk_size: int | None):
    """``model(x)`` computed ``chunk_size`` rows at a time with activation checkpointing when
    gradients are needed; the outputs (tensors or tuples of tensors) are concatenated. Without
    ``chunk_size`` (or when no graph is built, or the batch fits one chunk) it is ``model(x)``.
    """
    if not chunk_size or x.shape[0] <= chunk_size or not torch.is_grad_enabled():
        return model(x)
    ctx = functools.partial(_contexts, model)
    outs = [checkpoint(model, xc, use_reentrant=False, context_fn=ctx)
            for xc in x.split(int(chunk_size))]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)
