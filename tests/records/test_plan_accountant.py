"""A plan records the accountant it was calibrated on, and the audit checks it by that one.

Runs written before PLD became the primary figure were calibrated on RDP and their dp_plan.json
says nothing of an accountant: they must still audit clean, and a plan that claims the wrong
accountant must not.
"""

from __future__ import annotations

import dataclasses

import dp_accounting
from dp_accounting import mechanism_calibration

from securegmi.privacy.accounting import rdp_accountant
from securegmi.privacy.calibration import DpPlan, calibrate, plan_from_dict
from securegmi.privacy.events import dpsgd_event, gaussian_event
from securegmi.privacy.ledger import PrivacyBudget, PrivacyLedger
from securegmi.records.audit import _plan_problems

BUDGET = PrivacyBudget(8.0, 1e-5)
ROUNDS, STEPS, RATE = 3, 10, 0.25


def _rdp_calibrated_plan() -> DpPlan:
    """The em plan as securegmi calibrated it before: DP-SGD's noise found on RDP."""
    pld = calibrate(BUDGET, rounds=ROUNDS, steps_per_round=STEPS, sample_rate=RATE)
    counts = dp_accounting.SelfComposedDpEvent(gaussian_event(pld.count_noise_multiplier), ROUNDS)
    sigma = mechanism_calibration.calibrate_dp_mechanism(
        rdp_accountant,
        lambda s: dp_accounting.ComposedDpEvent([counts, dpsgd_event(s, RATE, STEPS * ROUNDS)]),
        BUDGET.epsilon,
        BUDGET.delta,
        mechanism_calibration.ExplicitBracketInterval(0.3, 50.0),
        tol=1e-4,
    )
    return dataclasses.replace(pld, sgd_noise_multiplier=float(sigma), accountant="rdp")


def _problems(plan: DpPlan) -> list[str]:
    ledger = PrivacyLedger("c", BUDGET)
    for r in range(plan.rounds):
        ledger = ledger.check(plan.round_entries(r))
    config = {"epsilon": BUDGET.epsilon, "delta": BUDGET.delta}
    return _plan_problems(plan, config, {"c": ledger})


def test_a_new_plan_is_calibrated_on_pld_and_audits_clean():
    plan = calibrate(BUDGET, rounds=ROUNDS, steps_per_round=STEPS, sample_rate=RATE)
    assert plan.accountant == "pld" and plan.to_dict()["accountant"] == "pld"
    assert 0.999 * BUDGET.epsilon <= plan.planned_epsilon() <= BUDGET.epsilon * (1 + 1e-6)
    assert plan.planned_epsilon("rdp") > BUDGET.epsilon  # RDP's looseness, not an overspend
    assert plan_from_dict(plan.to_dict()) == plan
    assert _problems(plan) == []


def test_an_old_rdp_plan_without_an_accountant_still_audits_clean():
    old = _rdp_calibrated_plan().to_dict()
    old.pop("accountant")  # written before plans recorded it
    plan = plan_from_dict(old)
    assert isinstance(plan, DpPlan) and plan.accountant == "rdp"
    assert plan.planned_epsilon() < 0.98 * BUDGET.epsilon  # PLD: the old plan over-noised
    assert _problems(plan) == []


def test_a_plan_claiming_the_wrong_accountant_fails_the_audit():
    """Negative control: the same RDP-calibrated noise labelled as a PLD plan wastes 7% of the
    budget by PLD, which is not what securegmi calibrates."""
    mislabelled = dataclasses.replace(_rdp_calibrated_plan(), accountant="pld")
    assert any("not the plan securegmi calibrates" in p for p in _problems(mislabelled))


def test_a_plan_or_ledger_event_with_a_nan_noise_multiplier_is_not_read():
    """JSON as Python reads it admits NaN; a review forged a statistics plan with a NaN
    histogram noise whose moments and k-means then cost nothing by PLD."""
    import json
    import math

    import pytest

    from securegmi.errors import ConfigError, PrivacyError
    from securegmi.privacy.calibration import calibrate_statistics
    from securegmi.privacy.events import event_from_json, event_to_json

    plan = calibrate_statistics(BUDGET, clients=3, features=64)
    written = json.loads(json.dumps(plan.to_dict()))
    assert plan_from_dict(written) == plan  # control: the plan as written reads back
    forged = json.loads(json.dumps(written))
    forged["statistics"]["histogram_noise"] = math.nan
    with pytest.raises(ConfigError, match=r"statistics\.histogram_noise not finite"):
        plan_from_dict(json.loads(json.dumps(forged)))
    event = event_to_json(gaussian_event(1.0))
    assert event_from_json(event) == gaussian_event(1.0)
    with pytest.raises(PrivacyError, match="not a finite non-negative number"):
        event_from_json({**event, "noise_multiplier": math.nan})
