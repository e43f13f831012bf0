"""Bring your own model and data: three hospitals' own PyTorch encoder/decoder and DataLoaders,
driven by your own loop, under the secure protocol (DP-SGD + DP counts, encrypted uploads).

Run:  python examples/bring_your_own_model.py [--rounds 4] [--out DIR]

What you supply is marked YOURS; the rest is securegmi. Your code carries the bytes (here a
dict; in production a queue, HTTP, or Flower via securegmi.adapters.flower). The server holds
only the public CKKS context; each client checks its ledger before anything leaves.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import securegmi
from securegmi import (
    VAE,
    CkksParameters,
    Client,
    ClientPrivacy,
    MixtureOfVAEs,
    PrivacyBudget,
    SecretContext,
    Server,
    calibrate,
)

LATENT = 4


def my_component() -> VAE:
    """YOURS: any encoder (x -> [mu | logvar]) and decoder (z -> Bernoulli logits) Opacus can
    privatise: here ELU and LayerNorm, no BatchNorm."""
    encoder = nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.ELU(), nn.Linear(96, 2 * LATENT))
    decoder = nn.Sequential(nn.Linear(LATENT, 96), nn.ELU(), nn.Linear(96, 64))
    return VAE(encoder, decoder, LATENT, "bernoulli")


def my_loaders(seed: int = 0) -> dict[str, DataLoader]:
    """YOURS: each site's DataLoader of (image, label) pairs; labels never enter a client."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    rng = np.random.default_rng(seed)
    sites = {"hospital-a": [0, 1, 2, 3], "hospital-b": [3, 4, 5, 6], "hospital-c": [6, 7, 8, 9, 0]}
    loaders = {}
    for name, classes in sites.items():
        index = np.flatnonzero(np.isin(digits.target, classes))
        index = rng.choice(index, size=120, replace=False)
        loaders[name] = DataLoader(TensorDataset(x[index], y[index]), batch_size=64)
    return loaders


def main(rounds: int, out: Path) -> dict[str, object]:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    seed, components, epsilon = 0, 3, 8.0
    reference = MixtureOfVAEs.from_factory(my_component, components, seed)
    spec = securegmi.protocol("secure", reference)  # bound to your components' sizes

    # The study's public agreements: the DP plan and the key ceremony (one secret key shared
    # by the sites; the server gets public.ckks only).
    plan = calibrate(
        PrivacyBudget(epsilon, 1e-5), rounds=rounds, steps_per_round=8, sample_rate=0.25, clip_norm=1.0
    )
    with tempfile.TemporaryDirectory() as key_dir:
        SecretContext.generate(CkksParameters(max_clients=3)).save(Path(key_dir))
        keys = SecretContext.load(Path(key_dir), CkksParameters(max_clients=3))

    clients = {
        name: Client(
            name,
            MixtureOfVAEs.from_factory(my_component, components, seed),  # same public init everywhere
            loader,
            spec,
            privacy=ClientPrivacy(plan, batch_normaliser=16.0, ledger_path=out / f"{name}.ledger.json"),
            keys=keys,
            seed=seed,
            state_path=out / f"{name}.state.safetensors",  # resume after a crash
            transcript_path=out / f"{name}.transcript.jsonl",  # what left this site
        )
        for name, loader in my_loaders(seed).items()
    }
    # The server holds the public context only; its endpoint checks and records every message.
    server = Server(spec, keys.public(), transcript_path=out / "server.transcript.jsonl")

    for t in range(rounds):  # YOURS: the loop and the wire
        broadcast = server.broadcast(t, temperature=max(1.0, 10.0 * (1 - t / max(1, rounds - 1))))
        replies = {}
        for name, client in clients.items():
            reply_bytes = client.receive(server.endpoint.send(name, broadcast))
            replies[name] = server.endpoint.accept(name, reply_bytes)
        rejected = server.aggregate(replies)
        assert not rejected, rejected
    server.close()

    summary = {
        name: {
            "pi": [round(float(v), 3) for v in client.pi],
            "epsilon_spent": round(client.ledger.spent, 3) if client.ledger else None,
        }
        for name, client in clients.items()
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/byo-example"))
    args = parser.parse_args()
    main(args.rounds, args.out)
