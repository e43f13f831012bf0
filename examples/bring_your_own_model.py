"""Bring your own model and data: eight sites' own convolutional VAE and DataLoaders, under the
default private design (DP statistics, then DP-SGD), saved as a run directory an auditor can check.

Run:  python examples/bring_your_own_model.py [--records 150] [--vae-rounds 5] [--out DIR]
Then: securegmi audit DIR
      securegmi infer DIR --data DIR-new-site.csv --components examples/bring_your_own_model.py:my_component
      securegmi report DIR --components examples/bring_your_own_model.py:my_component

What you supply is marked YOURS; the rest is `import securegmi`. Each site holds only its own
records; what leaves it is declared by the protocol and charged to its privacy ledger first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import securegmi

LATENT, SITES, COMPONENTS = 4, 8, 3
# YOURS: which digit classes each source draws from; a site mixes the sources in its own way.
SOURCES = ([0, 1, 2, 3], [4, 5, 6], [7, 8, 9])


def my_component() -> securegmi.VAE:
    """YOURS: any encoder (x -> [mu | logvar]) and decoder (z -> Bernoulli logits) Opacus can
    privatise: convolutions with GroupNorm (DP-SGD refuses BatchNorm and dropout). Records
    arrive flattened (64 values); the encoder puts the 8 x 8 image back."""
    encoder = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ELU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.GroupNorm(4, 16),
        nn.ELU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 2 * LATENT),
    )
    decoder = nn.Sequential(nn.Linear(LATENT, 96), nn.ELU(), nn.Linear(96, 64))
    return securegmi.VAE(encoder, decoder, LATENT, "bernoulli")


def my_site(rng: np.random.Generator, records: int) -> torch.Tensor:
    """YOURS: one site's images in [0, 1], from a mixture of the sources."""
    digits = load_digits()
    weights = rng.dirichlet(np.full(len(SOURCES), 0.5))
    source = rng.choice(len(SOURCES), size=records, p=weights)
    rows = [rng.choice(np.flatnonzero(np.isin(digits.target, SOURCES[s]))) for s in source]
    return torch.tensor(digits.data[rows] / 16.0, dtype=torch.float32)


def my_loaders(records: int, seed: int = 0) -> dict[str, DataLoader[tuple[torch.Tensor, ...]]]:
    """YOURS: each site's DataLoader (securegmi reads the records from it once)."""
    rng = np.random.default_rng(seed)
    return {
        f"site-{i}": DataLoader(TensorDataset(my_site(rng, records)), batch_size=64) for i in range(SITES)
    }


def new_site_file(out: Path) -> Path:
    """Where the example leaves a new site's records, beside (not inside) the run directory."""
    return out.with_name(f"{out.name}-new-site.csv")


def main(
    records: int, vae_rounds: int, local_epochs: int, out: Path, epsilon: float = 8.0
) -> dict[str, object]:
    torch.set_num_threads(1)
    seed = 0
    reference = securegmi.MixtureOfVAEs.from_factory(my_component, COMPONENTS, seed)  # public init
    # The study's public agreements: the plan from the budget and public sizes only, and the
    # protocol bound to the components and the plan (it declares the plan's minimum cohort).
    plan = securegmi.calibrate_statistics(
        securegmi.PrivacyBudget(epsilon, 1e-5),
        clients=SITES,
        features=64,
        vae_rounds=vae_rounds,
        local_epochs=local_epochs,
        seed=seed,
    )
    spec = securegmi.bind_protocol("dp", reference, plan=plan, clients=SITES)
    out.mkdir(parents=True, exist_ok=True)
    clients = [
        securegmi.Client(
            name,
            reference,  # each client takes its own copy
            loader,
            spec,
            privacy=securegmi.ClientPrivacy(plan, batch_normaliser=16.0, slot=i, cohort=SITES),
            seed=seed,
        )
        for i, (name, loader) in enumerate(my_loaders(records, seed).items())
    ]
    # The server's transcript is the auditor's record of everything that left each site.
    server = securegmi.Server(spec, transcript_path=out / "transcript.jsonl")
    securegmi.run_federation(
        clients, server, progress=lambda t, o: print(f"round {t}: {len(o.replies)} replies")
    )
    securegmi.save(out, clients, server)

    # A site that did not take part learns its mixture proportions from its records alone.
    new_site = my_site(np.random.default_rng(99), records).numpy()
    np.savetxt(new_site_file(out), new_site, delimiter=",", fmt="%.6f")  # for `securegmi infer`
    model = securegmi.load(out, components=my_component)
    summary = {
        "sites": {c.client_id: [round(float(v), 3) for v in c.pi] for c in clients},
        "epsilon_spent": max(c.ledger.spent for c in clients if c.ledger is not None),
        "new_site_pi": [round(float(v), 3) for v in model.estimate_pi(new_site)],
        "run_dir": str(out),
        "new_site": str(new_site_file(out)),
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--records", type=int, default=150, help="records per site")
    parser.add_argument("--vae-rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=Path("runs/byo-example"))
    args = parser.parse_args()
    main(args.records, args.vae_rounds, args.local_epochs, args.out, args.epsilon)
