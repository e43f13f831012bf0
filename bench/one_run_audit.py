"""One-run empirical audit of the clients' DP-SGD (Steinke, Nasr and Jagielski, NeurIPS 2023),
against the claim, beside a broken twin whose noise multiplier is 0.1x its claim's.

Client-0 of the default federation (digits, 20 clients) trains the default model (K=3 MLP VAEs,
hidden 128) with DP-SGD for the default plan's sample rate and number of steps, with Dirac
canaries among its records (`securegmi.privacy.auditing`): each canary is included with
probability 1/2, only the final parameters are observed, and the auditor guesses "in" for the
`--guesses` highest probe weights and "out" for as many of the lowest. The empirical epsilon is
a 95% lower bound: a sound mechanism stays below its claim, the twin must not.

Claims: the DP-SGD part of the default `--epsilon 8` plan (its own noise multiplier), and DP-SGD
calibrated alone to epsilon 1, 2 and 4 at the same sample rate and steps. With m canaries and r
guesses the bound cannot exceed what r correct guesses give (5.7 at m = 5000, r = 1000), so a
twin can only be caught above claims below that.

    python bench/one_run_audit.py [--canaries 5000] [--guesses 500] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from securegmi.config import SimulationConfig
from securegmi.core.em import mixture_loss
from securegmi.privacy.accounting import epsilon_pld
from securegmi.privacy.auditing import audit_dp_sgd, empirical_epsilon
from securegmi.privacy.calibration import PrivateMixturePlan, dp_sgd_noise
from securegmi.privacy.dpsgd import DpSgdConfig
from securegmi.privacy.events import dpsgd_event
from securegmi.privacy.ledger import PrivacyBudget
from securegmi.simulation.study import dp_plan, load_federated_data, new_model

RESULTS = Path(__file__).parent / "results" / "one_run_audit.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--canaries", type=int, default=5000)
    parser.add_argument("--guesses", type=int, default=500, help="guesses per side")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = SimulationConfig(protocol="secure", epsilon=8.0)  # what `securegmi simulate --epsilon 8` runs
    data = load_federated_data(config)
    plan = dp_plan(config, data)
    assert isinstance(plan, PrivateMixturePlan)
    steps = plan.steps_per_round * plan.vae_rounds
    q, delta = plan.sample_rate, plan.delta
    client = data.clients[0]
    x = torch.as_tensor(client.x_train)
    # The client's DP-SGD weights each record's loss by its responsibilities; uniform ones
    # stand in (what the records are trained on does not change the canaries' mechanism).
    components = new_model(config, data).n_components
    resp = torch.full((len(x), components), 1 / components)
    claims = [
        ("default plan (--epsilon 8), DP-SGD part", plan.sgd_noise_multiplier),
        *(
            (
                f"DP-SGD alone at epsilon {e:g}",
                dp_sgd_noise(PrivacyBudget(e, delta), sample_rate=q, steps=steps),
            )
            for e in (1.0, 2.0, 4.0)
        ),
    ]
    ceiling = empirical_epsilon(args.canaries, 2 * args.guesses, 2 * args.guesses, delta)
    rows = []
    for label, sigma in claims:
        claim = epsilon_pld([dpsgd_event(sigma, q, steps)], delta)
        for twin, factor in (("claimed", 1.0), ("twin x0.1", 0.1)):
            found, started = [], time.perf_counter()
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                audit = audit_dp_sgd(
                    new_model(config, data),
                    x,
                    lambda out, idx: mixture_loss(out, resp[idx]),
                    DpSgdConfig(sigma * factor, plan.clip_norm, q, q * (len(x) + args.canaries / 2)),
                    steps,
                    canaries=args.canaries,
                    guesses=args.guesses,
                    delta=delta,
                    learning_rate=config.step_size,
                    seed=seed,
                )
                found.append(audit)
            eps = [a.empirical_epsilon for a in found]
            row = {
                "claim": label,
                "mechanism": twin,
                "noise_multiplier": sigma * factor,
                "claimed_epsilon": claim,
                "empirical_epsilon": eps,
                "empirical_mean": statistics.mean(eps),
                "empirical_sd": statistics.stdev(eps) if len(eps) > 1 else 0.0,
                "correct": [a.correct for a in found],
                "exceeds_claim": [e > claim for e in eps],
                "seconds": time.perf_counter() - started,
            }
            rows.append(row)
            print(
                f"{label:42s} {twin:10s} sigma {sigma * factor:7.3f}  claim {claim:5.2f}  "
                f"empirical {row['empirical_mean']:.2f} ± {row['empirical_sd']:.2f} "
                f"(max {max(eps):.2f}; correct {row['correct']} of {2 * args.guesses})"
            )
    out = {
        "command": "python bench/one_run_audit.py",
        "dataset": config.dataset,
        "client_records": len(x),
        "sample_rate": q,
        "steps": steps,
        "delta": delta,
        "canaries": args.canaries,
        "guesses": 2 * args.guesses,
        "confidence": 0.95,
        "ceiling": ceiling,
        "seeds": list(range(args.seeds)),
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"ceiling (every guess right): {ceiling:.2f}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
