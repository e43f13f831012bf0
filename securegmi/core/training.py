"""Local M-step: minibatch training of all K components on responsibility-weighted ELBOs."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from securegmi.core.em import mixture_loss
from securegmi.core.mixture import MixtureOfVAEs


def e_step_elbo(model: MixtureOfVAEs, x: np.ndarray, samples: int) -> Tensor:
    """(n, K) ELBO matrix without gradients, in evaluation mode."""
    model.eval()
    with torch.no_grad():
        return model.elbo_matrix(torch.as_tensor(x), samples)


def train_components(
    model: MixtureOfVAEs,
    x: np.ndarray,
    resp: Tensor,
    optimiser: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    generator: np.random.Generator,
) -> float:
    """`optimiser` on sum_k r_k(x) (-ELBO_k(x)), shuffled minibatches; returns the last epoch's
    mean loss.

    The loss is averaged over the batch per sample, so its scale does not depend on how much
    data a client holds.
    """
    model.train()
    xt = torch.as_tensor(x)
    n = len(xt)
    last = float("nan")
    for _ in range(epochs):
        order = torch.as_tensor(generator.permutation(n))
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = mixture_loss(model(xt[idx]), resp[idx]).mean()
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        last = total / max(n, 1)
    return last
