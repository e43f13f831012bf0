"""Law 1 of docs/design.md §2: randomness belongs to the record. Removing any one record, at any
position, moves each release's pre-noise value by at most its declared sensitivity: the DP-SGD
clipped gradient sum (local steps and split shares) by the clipping norm C, the em design's
soft counts by 1. (The statistics releases: test_statistics, at the same positions.)

The negative control is the positional draw main shipped before: latent draws handed out by a
record's position in the batch from a public seed, where removing the first record shifts
every later record's draws and moves the clipped sum by several C.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from securegmi.config import SimulationConfig
from securegmi.core.em import mixture_loss
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.federation.server import Server
from securegmi.privacy.dpsgd import DpSgdConfig, PrivateTrainer
from securegmi.privacy.noise import NoiseSource
from securegmi.simulation.study import load_federated_data, new_model

from ..doubles import record_clipped_sums, record_counts
from .test_dp import CONFIG as EM_CONFIG
from .test_dp import _dp_client, _spec

DIGITS = SimulationConfig(dataset="digits", clients=20, hidden=32, latent=8)
CLIP = 1.0
N = 48  # records of client 0 the checks use


def _positions(n: int) -> list[int]:
    return [0, n // 2, n - 1, int(np.random.default_rng(11).integers(n))]


def positional_draws(self: MixtureOfVAEs, x: torch.Tensor, samples: int) -> torch.Tensor:
    """The draw main shipped before law 1: one public seed per call, values by batch position."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    shape = (x.shape[0], self.n_components, samples, self.latent)
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


@contextmanager
def drawn_by_position(monkeypatch: pytest.MonkeyPatch, positional: bool) -> Iterator[None]:
    if positional:
        monkeypatch.setattr(MixtureOfVAEs, "_draws", positional_draws)
    try:
        yield
    finally:
        monkeypatch.undo()


def _digits() -> tuple[np.ndarray, torch.Tensor]:
    data = load_federated_data(DIGITS)
    x = data.clients[0].x_train[:N]
    scores = torch.randn(len(x), DIGITS.components, generator=torch.Generator().manual_seed(4))
    resp = torch.softmax(scores, 1)
    return x, resp


def pre_noise_sum(x: np.ndarray, resp: torch.Tensor, path: str) -> torch.Tensor:
    """The clipped gradient sum over all of `x` as one DP-SGD path computes it, before noise:
    a local step's (observed where the noise would be added) or a split step's share."""
    model = new_model(DIGITS, load_federated_data(DIGITS))
    trainer = PrivateTrainer(
        model, torch.optim.Adam(model.parameters(), 1e-3), DpSgdConfig(1.0, CLIP, 0.5, 16.0), NoiseSource(0)
    )
    xt = torch.as_tensor(x)
    seen = record_clipped_sums(trainer)

    def loss(module: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
        return mixture_loss(module(xt[idx]), resp[idx])

    torch.manual_seed(123)  # the step's public context: the same for both neighbours
    batch = torch.arange(len(x))
    if path == "local step":
        trainer.step(loss, batch)
    else:
        trainer.noisy_share(loss, batch, 0.5)
    (grads,) = seen  # the one clipped sum this step formed
    return torch.cat([g.reshape(-1) for g in grads])


def worst_move(monkeypatch: pytest.MonkeyPatch, path: str, positional: bool) -> list[float]:
    x, resp = _digits()
    moves = []
    with drawn_by_position(monkeypatch, positional):
        full = pre_noise_sum(x, resp, path)
        for i in _positions(len(x)):
            keep = np.delete(np.arange(len(x)), i)
            moved = full - pre_noise_sum(x[keep], resp[keep], path)
            moves.append(float(moved.norm()) / CLIP)
    return moves


@pytest.mark.slow
@pytest.mark.parametrize("path", ["local step", "split share"])
def test_removing_any_record_moves_the_clipped_sum_by_at_most_c(monkeypatch, path):
    moves = worst_move(monkeypatch, path, positional=False)
    assert all(0 < m <= 1 + 1e-4 for m in moves), moves


@pytest.mark.slow
def test_negative_control_positional_draws_move_it_by_more(monkeypatch):
    moves = worst_move(monkeypatch, "local step", positional=True)
    assert moves[0] > 1.5, moves  # the first record: every later draw shifts
    assert moves[2] <= 1 + 1e-4, moves  # the last: the one case the old tests looked at


def _pre_noise_counts(x: np.ndarray) -> np.ndarray:
    spec, _ = _spec(EM_CONFIG)
    client = _dp_client(x, spec, noise_seed=3)
    exact = record_counts(client.policy)
    client.handle(Server(spec).broadcast(0, 1.0))
    (counts,) = exact  # round 0's one count release
    return counts


def count_moves(monkeypatch: pytest.MonkeyPatch, positional: bool) -> list[float]:
    x = load_federated_data(EM_CONFIG).clients[0].x_train
    with drawn_by_position(monkeypatch, positional):
        full = _pre_noise_counts(x)
        neighbours = [_pre_noise_counts(np.delete(x, i, 0)) for i in _positions(len(x))]
    return [float(np.linalg.norm(full - counts)) for counts in neighbours]


@pytest.mark.slow
def test_removing_any_record_moves_the_soft_counts_by_at_most_one(monkeypatch):
    moves = count_moves(monkeypatch, positional=False)
    assert all(0 < m <= 1 + 1e-6 for m in moves), moves


@pytest.mark.slow
def test_negative_control_positional_draws_move_the_counts_by_more(monkeypatch):
    moves = count_moves(monkeypatch, positional=True)
    assert moves[0] > 1 + 1e-3, moves


class _Noisy(torch.nn.Module):
    """An encoder body with randomness of its own, as a user's component might have."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.linear = kind, torch.nn.Linear(DIGITS_DIM, 2 * 2)
        self.rrelu = torch.nn.RReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "F.dropout":
            x = torch.nn.functional.dropout(x, 0.1, self.training)
        elif self.kind == "randn_like":
            x = x + 0.01 * torch.randn_like(x)
        out = self.linear(x)
        return self.rrelu(out) if self.kind == "RReLU" else out


DIGITS_DIM = 64


def _user_components(kind: str | None) -> MixtureOfVAEs:
    from securegmi.core.vae import VAE

    def factory() -> VAE:
        encoder = _Noisy(kind) if kind else torch.nn.Linear(DIGITS_DIM, 4)
        decoder = torch.nn.Sequential(
            torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, DIGITS_DIM)
        )
        return VAE(encoder, decoder, 2, "bernoulli")

    return MixtureOfVAEs.from_factory(factory, 3, 0)


@pytest.mark.parametrize("kind", ["F.dropout", "randn_like", "RReLU"])
def test_a_component_with_randomness_of_its_own_is_refused_under_dp(kind):
    from securegmi.errors import PrivacyError
    from securegmi.privacy.dpsgd import check_record_randomness

    x = torch.as_tensor(_digits()[0][:4])
    with pytest.raises(PrivacyError, match="draws random numbers from torch's global generator"):
        check_record_randomness(_user_components(kind), x)
    before = torch.random.get_rng_state()
    check_record_randomness(_user_components(None), x)  # negative control: the same without it
    assert torch.equal(before, torch.random.get_rng_state())  # the probe leaves no trace


def test_a_dp_client_with_such_a_component_is_refused_before_it_releases_anything():
    import securegmi
    from securegmi.errors import PrivacyError
    from securegmi.federation.client import Client
    from securegmi.federation.release import ClientPrivacy
    from securegmi.simulation.study import dp_plan

    config = SimulationConfig(dataset="digits", clients=20, protocol="dp", epsilon=4.0, private_training="em")
    plan = dp_plan(config, load_federated_data(config))
    x = _digits()[0]

    def client(kind: str | None) -> Client:
        components = _user_components(kind)
        spec = securegmi.bind_protocol("dp", components, plan=plan)
        return Client("client-0", components, x, spec, privacy=ClientPrivacy(plan, 16.0))

    with pytest.raises(PrivacyError, match="draws random numbers"):
        client("F.dropout")
    assert client(None).ledger is not None  # negative control
