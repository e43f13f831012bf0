"""Opacus' per-sample gradient rules for `BatchedLinear`, the fused mixture's layer.

Opacus computes per-sample gradients layer by layer from each layer's input a and output
gradient b ("activations" and "backprops"); it knows nn.Linear, and a new layer type is taught
through its registries. For K maps with their own rows, sample i's gradient of W_k is the outer
product b_ik a_ik^T, so, as for nn.Linear (Li et al., ICLR 2022, "ghost clipping"),

    ||grad_i W||^2 = sum_k ||b_ik||^2 ||a_ik||^2,    ||grad_i bias||^2 = sum_k ||b_ik||^2,

with a_ik = a_i when the input is shared. Opacus joins these with every other parameter's
norms into the sample's one gradient norm, which it clips: the mechanism is the same joint
clipping over all K components as with K separate nn.Linear layers (the test compares them).

The same two tensors also give the clipped gradient sum directly: with clipping factors c_i,
sum_i c_i grad_i W_k = sum_i c_i b_ik a_ik^T. Opacus gets that sum from a second backward pass
through the whole module (its DPTensorFastGradientClipping); a module made only of these layers
gets it from the first pass's tensors (Bu et al., ICML 2023, "book-keeping"), which the norm
sampler keeps for `add_clipped_sums`.
"""

from __future__ import annotations

import weakref
from functools import cache

import torch
from torch import Tensor, nn

from securegmi.core.batched import BatchedLinear

_last_pass: weakref.WeakKeyDictionary[BatchedLinear, tuple[Tensor, Tensor]] = weakref.WeakKeyDictionary()


def _per_component_input(activations: list[Tensor]) -> Tensor:
    """The layer's input as (batch, K or 1, in): a shared input broadcasts over K."""
    a = activations[0]
    return a[:, None, :] if a.dim() == 2 else a


def _norm_sample(
    layer: BatchedLinear, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    # Kept for add_clipped_sums until the layer's next pass. Opacus has already scaled a
    # mean-reduced loss's output gradients back to per-sample ones.
    _last_pass[layer] = (activations[0], backprops)
    b2 = backprops.pow(2).sum(-1)  # (batch, K)
    a2 = _per_component_input(activations).pow(2).sum(-1)  # (batch, K) or (batch, 1)
    return {layer.weight: (b2 * a2).sum(1).sqrt(), layer.bias: b2.sum(1).sqrt()}


def _grad_sample(
    layer: BatchedLinear, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    a = _per_component_input(activations).expand(-1, backprops.shape[1], -1)
    return {layer.weight: torch.einsum("bko,bki->bkoi", backprops, a), layer.bias: backprops}


def only_batched_layers(module: nn.Module) -> bool:
    """True if every trainable parameter of `module` belongs to a BatchedLinear layer."""
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    batched = {id(p) for m in module.modules() if isinstance(m, BatchedLinear) for p in m.parameters()}
    return bool(trainable) and trainable <= batched


def forget_last_pass(module: nn.Module) -> None:
    """Drop what the norm sampler kept of `module`'s layers, so that a layer the next pass
    misses fails loudly in add_clipped_sums instead of lending an earlier batch's tensors."""
    for layer in module.modules():
        if isinstance(layer, BatchedLinear):
            _last_pass.pop(layer, None)


def add_clipped_sums(module: nn.Module, coefficients: Tensor) -> None:
    """Set each BatchedLinear parameter's .grad to sum_i c_i grad_i from the layer's last pass."""
    for layer in module.modules():
        if isinstance(layer, BatchedLinear):
            a, b = _last_pass.pop(layer)
            weighted = coefficients.to(b.dtype)[:, None, None] * b
            shared = "bi" if a.dim() == 2 else "bki"
            layer.weight.grad = torch.einsum(f"bko,{shared}->koi", weighted, a)
            layer.bias.grad = weighted.sum(0)


@cache
def register_batched_samplers() -> None:
    """Teach Opacus `BatchedLinear`: once per process, before any module is wrapped."""
    from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler

    register_norm_sampler(BatchedLinear)(_norm_sample)
    register_grad_sampler(BatchedLinear)(_grad_sample)
