"""PNG plots of a run directory (matplotlib, headless)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from securegmi.errors import RunDirectoryError
from securegmi.files import write_atomic
from securegmi.records.rundir import read_run

if TYPE_CHECKING:
    from securegmi.core.mixture import ComponentFactory
    from securegmi.privacy.ledger import PrivacyLedger
    from securegmi.records.trained import TrainedMixture


def write_plots(run_dir: Path, components: ComponentFactory | None = None) -> list[Path]:
    """The plots of a run; `components` is the factory of a bring-your-own run's components."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Everything is read (and checked) before anything is written: a run directory with one
    # unreadable file gets no plots at all, not some of them.
    results, metrics = read_run(run_dir)
    run = _Figures.of(Path(run_dir), results, metrics)
    model, ledgers = _model(run_dir, components), _ledgers(run_dir)
    true, est, names = run.true, run.estimated, run.names
    clients = np.arange(len(est))
    written = []

    fig, axes = plt.subplots(len(names), 1, figsize=(max(6, len(est) * 0.45), 2.2 * len(names)), sharex=True)
    for s, ax in enumerate(np.atleast_1d(axes)):
        if true is not None:
            ax.bar(clients - 0.2, true[:, s], width=0.4, label="true", color="0.6")
        ax.bar(clients + 0.2 * (true is not None), est[:, s], width=0.4, label="estimated", color="tab:blue")
        ax.set_ylim(0, 1)
        ax.set_ylabel(names[s], fontsize=8)
    np.atleast_1d(axes)[0].legend(loc="upper right", fontsize=8)
    np.atleast_1d(axes)[-1].set_xlabel("client")
    np.atleast_1d(axes)[-1].set_xticks(clients)
    # A deployment (a run of your own loop) has no true proportions to score against.
    scored = "" if run.pi_tv_error is None else f" (mean TV error {run.pi_tv_error:.3f})"
    fig.suptitle(f"{run.method}: mixture proportions{scored}")
    written.append(_save(fig, run_dir, "pi.png"))

    if run.rounds:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(run.rounds, run.accuracy, label="source accuracy")
        ax.plot(run.rounds, run.round_tv, label="mean pi TV error")
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{run.method} on {run.dataset}, seed {run.seed}")
        written.append(_save(fig, run_dir, "rounds.png"))
    drawn = (write_samples(run_dir, model=model), write_privacy(run_dir, ledgers=ledgers))
    written += [p for p in drawn if p is not None]
    return written


def _model(run_dir: Path, components: ComponentFactory | None = None) -> TrainedMixture | None:
    from securegmi.records.trained import load

    if not os.path.lexists(Path(run_dir) / "model.safetensors"):
        return None
    return load(run_dir, components=components)


def _ledgers(run_dir: Path) -> list[PrivacyLedger]:
    from securegmi.privacy.ledger import PrivacyLedger

    return [PrivacyLedger.load(p) for p in sorted((Path(run_dir) / "ledgers").glob("*.json"))]


@dataclass(frozen=True)
class _Figures:
    """What the plots draw, read from results.json and metrics.jsonl and checked first, so that
    an edited file is one clear error rather than a failure inside matplotlib."""

    method: str
    dataset: str
    seed: int
    pi_tv_error: float | None  # None: no ground truth (a run of your own loop)
    names: list[str]
    true: np.ndarray | None  # (clients, sources); None without ground truth
    estimated: np.ndarray
    rounds: list[int]
    accuracy: list[float]
    round_tv: list[float]

    @classmethod
    def of(cls, run_dir: Path, results: dict[str, Any], metrics: list[dict[str, Any]]) -> _Figures:
        try:
            rows = results["per_client"]
            estimated = np.array([r["pi_estimate"] for r in rows], dtype=np.float64)
            truth = "source_names" in results
            if truth:
                names = [str(n) for n in results["source_names"]]
                true = np.array([r["pi_true"] for r in rows], dtype=np.float64)
            else:  # estimates over the components, nothing to compare them with
                names = [f"component {k}" for k in range(estimated.shape[1] if estimated.ndim == 2 else 0)]
                true = estimated
            if not names or true.shape != (len(rows), len(names)) or estimated.shape != true.shape:
                raise ValueError("per-client proportions do not match the sources")
            if not (np.isfinite(true).all() and np.isfinite(estimated).all()):
                raise ValueError("non-finite proportions")
            return cls(
                str(results["method"]),
                str(results["dataset"]),
                int(results["seed"]),
                float(results["pi_tv_error"]) if truth else None,
                names,
                true if truth else None,
                estimated,
                [int(m["round"]) for m in metrics],
                [float(m["source_accuracy"]) for m in metrics],
                [float(m["pi_tv_error"]) for m in metrics],
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise RunDirectoryError(
                f"{run_dir}: results.json or metrics.jsonl is not what securegmi wrote ({exc!r:.120})"
            ) from None


def write_samples(run_dir: Path, per_component: int = 8, model: TrainedMixture | None = None) -> Path | None:
    """samples.png: decoded samples of each component, one row per component (image data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = model if model is not None else _model(run_dir)
    if model is None:
        return None
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


def write_privacy(run_dir: Path, ledgers: list[PrivacyLedger] | None = None) -> Path | None:
    """privacy.png: epsilon spent per client after each round against the budget (and, under
    split noise, the fallback figure against the server colluding with one client)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from securegmi.privacy.ledger import PrivacyLedger

    ledgers = ledgers if ledgers is not None else _ledgers(run_dir)
    if not ledgers:
        return None
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
    ax.set_ylabel("epsilon spent (PLD)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"privacy spent per client, delta {ledgers[0].budget.delta:g}")
    return _save(fig, run_dir, "privacy.png")


def _save(fig: Any, run_dir: Path, name: str) -> Path:
    """The figure as PNG bytes, then written atomically into the run directory: `savefig` to a
    path would follow a link planted under that name and write wherever it points."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(run_dir) / name
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    plt.close(fig)
    write_atomic(path, png.getvalue())
    return path
