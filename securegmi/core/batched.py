"""K independent linear layers evaluated as one: the building block of the fused mixture."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class BatchedLinear(nn.Module):
    """K affine maps x -> W_k x + b_k in one layer: weight (K, out, in), bias (K, out).

    Input (batch, in) is shared by every map, so the K maps are one matrix product; input
    (batch, K, in) gives map k its own row k, one batched product. Output (batch, K, out).
    The batch stays on dimension 0, as Opacus' per-sample hooks require. torch has no layer for
    this (nn.Linear shares one weight; torch.func.vmap over K modules costs a Python call per
    layer per component, the overhead this layer exists to remove).
    """

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        if weight.dim() != 3 or tuple(bias.shape) != tuple(weight.shape[:2]):
            raise ValueError(
                f"weight (K, out, in) and bias (K, out) expected, got {weight.shape}, {bias.shape}"
            )
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        k, out, inp = self.weight.shape
        if x.dim() == 2:
            flat = F.linear(x, self.weight.reshape(k * out, inp), self.bias.reshape(k * out))
            return flat.view(x.shape[0], k, out)
        # (K, batch, in) @ (K, in, out) + (K, 1, out), then the batch back to the front.
        return torch.baddbmm(self.bias[:, None, :], x.transpose(0, 1), self.weight.transpose(1, 2)).transpose(
            0, 1
        )
