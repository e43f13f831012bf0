"""Evaluation against ground truth, done by the simulation harness, never by a client."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from securegmi.core.em import log_prior, responsibilities
from securegmi.core.metrics import map_proportions, match_components, source_accuracy, total_variation
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.data.mixture import FederatedData

_EVAL_SEED = 7_919
Scorer = Callable[[np.ndarray], np.ndarray]  # records -> (n, K) log-likelihoods per component


@dataclass(frozen=True)
class Evaluation:
    source_accuracy: float
    pi_tv_error: float
    nll: float | None  # held-out personalised NLL bound in nats, -log sum_k pi_k p_k(x) (IWAE)
    per_client: tuple[dict[str, Any], ...]


def evaluate(
    models: Sequence[MixtureOfVAEs],
    pis: Sequence[np.ndarray],
    data: FederatedData,
    *,
    per_client_matching: bool,
    elbo_samples: int,
    iwae_samples: int | None = None,
    scorer: Scorer | None = None,
) -> Evaluation:
    """Score test splits: sample-level source identification argmax_k r_k(x) at T = 1, each
    client's pi against its true source frequencies, and optionally the personalised NLL.

    Shared components are matched to sources once over all clients; `per_client_matching` is for
    methods whose components differ by client (local training), matched client by client.
    """
    torch.manual_seed(_EVAL_SEED)
    assigned, nll_terms = [], []
    for model, pi, client in zip(models, pis, data.clients, strict=True):
        model.eval()
        with torch.no_grad():
            x = torch.as_tensor(client.x_test)
            scores = (
                model.elbo_matrix(x, elbo_samples)
                if scorer is None
                else torch.as_tensor(scorer(client.x_test), dtype=torch.float32)
            )
            r = responsibilities(scores, log_prior(pi))
            assigned.append(r.argmax(1).numpy())
            if iwae_samples:
                ll = torch.logsumexp(log_prior(pi) + model.iwae_matrix(x, iwae_samples), dim=1)
                nll_terms.append(-ll.numpy())
    s, k = data.n_sources, len(pis[0])
    if per_client_matching:
        mappings = [
            match_components(c.source_test, a, s, k) for c, a in zip(data.clients, assigned, strict=True)
        ]
    else:
        shared = match_components(
            np.concatenate([c.source_test for c in data.clients]), np.concatenate(assigned), s, k
        )
        mappings = [shared] * len(data.clients)
    rows = []
    correct = 0
    for i, (client, a, pi, mapping) in enumerate(zip(data.clients, assigned, pis, mappings, strict=True)):
        acc = source_accuracy(client.source_test, a, mapping)
        correct += int(np.sum(mapping[a] == client.source_test))
        pi_by_source = map_proportions(pi, mapping, s)
        rows.append(
            {
                "client": i,
                "pi_true": client.pi_true.round(4).tolist(),
                "pi_estimate": pi_by_source.round(4).tolist(),
                "pi_tv_error": float(total_variation(pi_by_source, client.pi_true)),
                "source_accuracy": acc,
                "test_samples": len(a),
            }
        )
    total = sum(len(a) for a in assigned)
    return Evaluation(
        source_accuracy=correct / total,
        pi_tv_error=float(np.mean([r["pi_tv_error"] for r in rows])),
        nll=float(np.mean(np.concatenate(nll_terms))) if nll_terms else None,
        per_client=tuple(rows),
    )
