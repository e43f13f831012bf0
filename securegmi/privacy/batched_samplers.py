"""Opacus' per-sample gradient rules for `BatchedLinear`, the fused mixture's layer.

Opacus computes per-sample gradients layer by layer from each layer's input a and output
gradient b ("activations" and "backprops"); it knows nn.Linear, and a new layer type is taught
through its registries. For K maps with their own rows, sample i's gradient of W_k is the outer
product b_ik a_ik^T, so, as for nn.Linear (Li et al., ICLR 2022, "ghost clipping"),

    ||grad_i W||^2 = sum_k ||b_ik||^2 ||a_ik||^2,    ||grad_i bias||^2 = sum_k ||b_ik||^2,

with a_ik = a_i when the input is shared. Opacus joins these with every other parameter's
norms into the sample's one gradient norm, which it clips: the mechanism is the same joint
clipping over all K components as with K separate nn.Linear layers (the test compares them).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor, nn

from securegmi.core.batched import BatchedLinear


def _per_component_input(activations: list[Tensor]) -> Tensor:
    """The layer's input as (batch, K or 1, in): a shared input broadcasts over K."""
    a = activations[0]
    return a[:, None, :] if a.dim() == 2 else a


def _norm_sample(
    layer: BatchedLinear, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    b2 = backprops.pow(2).sum(-1)  # (batch, K)
    a2 = _per_component_input(activations).pow(2).sum(-1)  # (batch, K) or (batch, 1)
    return {layer.weight: (b2 * a2).sum(1).sqrt(), layer.bias: b2.sum(1).sqrt()}


def _grad_sample(
    layer: BatchedLinear, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    a = _per_component_input(activations).expand(-1, backprops.shape[1], -1)
    return {layer.weight: torch.einsum("bko,bki->bkoi", backprops, a), layer.bias: backprops}


@cache
def register_batched_samplers() -> None:
    """Teach Opacus `BatchedLinear`: once per process, before any module is wrapped."""
    from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler

    register_norm_sampler(BatchedLinear)(_norm_sample)
    register_grad_sampler(BatchedLinear)(_grad_sample)
