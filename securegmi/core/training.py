"""Local M-step: minibatch training of all K components on responsibility-weighted ELBOs."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from securegmi.core.em import mixture_loss
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.errors import ConfigError


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


class SharedAdam:
    """Adam steps on `module` from given flat gradient vectors (parameters in `module.parameters()`
    order). Parties that start from the same parameters and apply the same vectors stay
    bit-identical, so a step computed once from an aggregate is every party's step."""

    def __init__(self, module: torch.nn.Module, learning_rate: float) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimiser = torch.optim.Adam(self.params, lr=learning_rate)

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params)

    def step(self, gradient: np.ndarray) -> None:
        if gradient.shape != (self.size,):
            raise ConfigError(f"a gradient of {self.size} values was expected, got shape {gradient.shape}")
        flat = torch.as_tensor(gradient, dtype=torch.float32)
        offset = 0
        for p in self.params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.optimiser.step()
        self.optimiser.zero_grad()

    def state_arrays(self, prefix: str = "adam.") -> dict[str, np.ndarray]:
        """Adam's moments and step counts, to continue the same trajectory in a fresh process."""
        out: dict[str, np.ndarray] = {}
        for i, p in enumerate(self.params):
            for name, value in self.optimiser.state.get(p, {}).items():
                out[f"{prefix}{i}.{name}"] = torch.as_tensor(value).detach().numpy().copy()
        return out

    def load_state(self, arrays: dict[str, np.ndarray], prefix: str = "adam.") -> None:
        for i, p in enumerate(self.params):
            head = f"{prefix}{i}."
            names = [k[len(head) :] for k in arrays if k.startswith(head)]
            if names:
                self.optimiser.state[p] = {n: torch.as_tensor(arrays[f"{head}{n}"]) for n in names}
