"""PNG plots of a run directory (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from securegmi.engine.rundir import read_run


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
    fig.tight_layout()
    path = Path(run_dir) / "pi.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

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
        fig.tight_layout()
        path = Path(run_dir) / "rounds.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
