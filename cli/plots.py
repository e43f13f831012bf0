"""PNG plots of a run directory (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from securegmi.records.rundir import read_run


def write_plots(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, metrics = read_run(run_dir)
    rows = results["per_client"]
    names = results["source_names"]
    true = np.array([r["pi_true"] for r in rows])
    est = np.array([r["pi_estimate"] for r in rows])
    clients = np.arange(len(rows))
    written = []

    fig, axes = plt.subplots(len(names), 1, figsize=(max(6, len(rows) * 0.45), 2.2 * len(names)), sharex=True)
    for s, ax in enumerate(np.atleast_1d(axes)):
        ax.bar(clients - 0.2, true[:, s], width=0.4, label="true", color="0.6")
        ax.bar(clients + 0.2, est[:, s], width=0.4, label="estimated", color="tab:blue")
        ax.set_ylim(0, 1)
        ax.set_ylabel(names[s], fontsize=8)
    np.atleast_1d(axes)[0].legend(loc="upper right", fontsize=8)
    np.atleast_1d(axes)[-1].set_xlabel("client")
    np.atleast_1d(axes)[-1].set_xticks(clients)
    fig.suptitle(f"{results['method']}: mixture proportions (mean TV error {results['pi_tv_error']:.3f})")
    written.append(_save(fig, run_dir, "pi.png"))

    if metrics:
        r = [m["round"] for m in metrics]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(r, [m["source_accuracy"] for m in metrics], label="source accuracy")
        ax.plot(r, [m["pi_tv_error"] for m in metrics], label="mean pi TV error")
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{results['method']} on {results['dataset']}, seed {results['seed']}")
        written.append(_save(fig, run_dir, "rounds.png"))
    written += [p for p in (write_samples(run_dir), write_privacy(run_dir)) if p is not None]
    return written


def write_samples(run_dir: Path, per_component: int = 8) -> Path | None:
    """samples.png: decoded samples of each component, one row per component (image data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from securegmi.records.trained import load

    if not (Path(run_dir) / "model.safetensors").exists():
        return None
    model = load(run_dir)
    side = round(model.data_dim**0.5)
    if side * side != model.data_dim:
        return None  # not square images: nothing to show as a picture
    k = model.n_components
    images = model.sample(per_component).reshape(k, per_component, side, side)
    fig, axes = plt.subplots(k, per_component, figsize=(per_component * 0.9, k * 0.95))
    for i in range(k):
        for j in range(per_component):
            ax = np.atleast_2d(axes)[i, j]
            ax.imshow(images[i, j], cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        np.atleast_2d(axes)[i, 0].set_ylabel(f"k={i}", fontsize=8)
    fig.suptitle("samples of each component (decoded means)", fontsize=9)
    return _save(fig, run_dir, "samples.png")


def write_privacy(run_dir: Path) -> Path | None:
    """privacy.png: epsilon spent per client after each round against the budget (and, under
    split noise, the fallback figure against the server colluding with one client)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from securegmi.privacy.ledger import PrivacyLedger

    paths = sorted((Path(run_dir) / "ledgers").glob("*.json"))
    if not paths:
        return None
    ledgers = [PrivacyLedger.load(p) for p in paths]
    curves: dict[tuple[str, ...], tuple[list[int], list[float], list[float], int]] = {}
    for ledger in ledgers:  # clients with the same releases share one curve
        key = tuple(f"{e.round}:{e.event_json}:{e.fallback_json}" for e in ledger.entries)
        if key in curves:
            rounds, spent, fallback, n = curves[key]
            curves[key] = (rounds, spent, fallback, n + 1)
            continue
        rounds = sorted({e.round for e in ledger.entries})
        prefixes = [
            PrivacyLedger(ledger.client_id, ledger.budget, tuple(e for e in ledger.entries if e.round <= r))
            for r in rounds
        ]
        curves[key] = (rounds, [p.spent for p in prefixes], [p.spent_fallback for p in prefixes], 1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for rounds, spent, fallback, n in curves.values():
        ax.plot(rounds, spent, marker="o", label=f"epsilon ({n} client{'s' if n > 1 else ''})")
        if fallback != spent:
            ax.plot(rounds, fallback, linestyle=":", label="server + 1 client (split noise)")
    ax.axhline(ledgers[0].budget.epsilon, color="red", linestyle="--", label="budget")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (RDP)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"privacy spent per client, delta {ledgers[0].budget.delta:g}")
    return _save(fig, run_dir, "privacy.png")


def _save(fig: Any, run_dir: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(run_dir) / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
