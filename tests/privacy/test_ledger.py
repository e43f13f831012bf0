from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest

from securegmi.errors import BudgetExceededError, ConfigError, PrivacyError
from securegmi.privacy.accounting import RDP_ORDERS, epsilon_pld
from securegmi.privacy.calibration import calibrate
from securegmi.privacy.events import dpsgd_event, event_from_json, event_to_json, gaussian_event
from securegmi.privacy.ledger import LedgerEntry, PrivacyBudget, PrivacyLedger

BUDGET = PrivacyBudget(8.0, 1e-5)


def test_event_json_roundtrip():
    event = dp_accounting.ComposedDpEvent([gaussian_event(3.0), dpsgd_event(1.1, 0.25, 40)])
    assert event_from_json(json.loads(json.dumps(event_to_json(event)))) == event


@pytest.mark.parametrize(
    "record",
    [
        {"type": "module", "module_name": "os", "class_name": "system"},  # never import by name
        {"type": "gaussian"},
        {"type": "self_composed", "count": "many", "event": {"type": "gaussian", "noise_multiplier": 1}},
    ],
)
def test_unknown_or_malformed_events_are_refused(record):
    with pytest.raises(PrivacyError):
        event_from_json(record)


def test_dpsgd_epsilon_matches_opacus_rdp_analysis():
    # Independent recomputation: Opacus' own RDP analysis of the Poisson-subsampled Gaussian.
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    q, sigma, steps, delta = 0.25, 1.3, 120, 1e-5
    ledger = PrivacyLedger("client-0", PrivacyBudget(100.0, delta)).project(
        [LedgerEntry.of(0, "dpsgd", dpsgd_event(sigma, q, steps))]
    )
    orders = list(RDP_ORDERS)
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    opacus_eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    # The RDP cross-check is Opacus' figure exactly; the primary (PLD) figure is tighter.
    assert ledger.spent_rdp == pytest.approx(float(opacus_eps), abs=1e-6)
    assert 0.5 * ledger.spent_rdp < ledger.spent < ledger.spent_rdp


def test_the_primary_figure_is_pld_and_rdp_is_the_looser_cross_check():
    ledger = PrivacyLedger("c", BUDGET).project(
        [LedgerEntry.of(r, "dpsgd", dpsgd_event(1.0, 0.2, 25)) for r in range(10)]
    )
    assert ledger.spent == pytest.approx(epsilon_pld(ledger.composed_events(), BUDGET.delta))
    assert 0.5 * ledger.spent_rdp < ledger.spent <= ledger.spent_rdp
    saved = ledger.to_json()
    assert saved["accountant"] == "pld" and saved["epsilon"] == ledger.spent
    assert saved["epsilon_rdp"] == ledger.spent_rdp


def test_a_pld_plan_fits_though_rdp_reads_above_the_budget():
    # Calibrated on PLD, the whole plan is accepted round by round although RDP, the looser
    # cross-check, would have refused its last rounds: the refusal follows the primary figure.
    plan = calibrate(BUDGET, rounds=4, steps_per_round=10, sample_rate=0.25)
    ledger = PrivacyLedger("c", BUDGET)
    for r in range(plan.rounds):
        ledger = ledger.check(plan.round_entries(r))
    assert ledger.spent <= BUDGET.epsilon * (1 + 1e-6) < ledger.spent_rdp


def test_exactly_the_planned_rounds_fit_and_one_more_is_refused():
    rounds = 6
    plan = calibrate(BUDGET, rounds=rounds, steps_per_round=10, sample_rate=0.25)
    ledger = PrivacyLedger("client-3", BUDGET)
    for r in range(rounds):
        ledger = ledger.check(plan.round_entries(r))
    assert ledger.spent <= BUDGET.epsilon * (1 + 1e-6)
    assert ledger.spent > 0.99 * BUDGET.epsilon  # calibrated to use the budget, not to waste it
    with pytest.raises(BudgetExceededError, match=r"client-3.*nothing was sent"):
        ledger.check(plan.round_entries(rounds))
    assert len(ledger.entries) == 2 * rounds  # the refused round left the ledger as it was


def test_check_does_not_mutate_the_ledger():
    ledger = PrivacyLedger("c", BUDGET)
    projected = ledger.check([LedgerEntry.of(0, "counts", gaussian_event(5.0))])
    assert ledger.entries == () and ledger.spent == 0.0
    assert len(projected.entries) == 1 and projected.spent > 0


def test_calibration_respects_the_count_share():
    plan = calibrate(BUDGET, rounds=20, steps_per_round=8, sample_rate=0.3, count_share=0.25)
    counts_only = PrivacyLedger("c", BUDGET).project(
        [LedgerEntry.of(r, "counts", gaussian_event(plan.count_noise_multiplier)) for r in range(20)]
    )
    assert counts_only.spent == pytest.approx(0.25 * BUDGET.epsilon, rel=1e-3)
    assert plan.planned_epsilon() <= BUDGET.epsilon * (1 + 1e-6)
    more_rounds = calibrate(BUDGET, rounds=40, steps_per_round=8, sample_rate=0.3, count_share=0.25)
    assert more_rounds.sgd_noise_multiplier > plan.sgd_noise_multiplier  # longer runs need more noise


def test_ledger_persists_and_reloads(tmp_path):
    plan = calibrate(BUDGET, rounds=3, steps_per_round=4, sample_rate=0.5)
    ledger = PrivacyLedger("client-1", BUDGET)
    for r in range(2):
        ledger = ledger.check(plan.round_entries(r))
    path = tmp_path / "client-1.json"
    ledger.save(path)
    back = PrivacyLedger.load(path)
    assert back == ledger
    assert back.spent == pytest.approx(ledger.spent)
    assert back.covers("counts@round1") and not back.covers("counts@round2")


def test_corrupt_ledger_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PrivacyError, match="cannot read"):
        PrivacyLedger.load(bad)
    bad.write_text(
        json.dumps(
            {
                "client": "c",
                "budget": {"epsilon": 1, "delta": 1e-5},
                "adjacency": "x",
                "entries": [{"round": 0, "name": "n", "event": {"type": "evil"}}],
            }
        )
    )
    with pytest.raises(PrivacyError, match="unknown ledger event"):
        PrivacyLedger.load(bad)


@pytest.mark.parametrize(("eps", "delta"), [(0.0, 1e-5), (np.inf, 1e-5), (8.0, 0.0), (8.0, 1.0)])
def test_invalid_budgets_are_refused(eps, delta):
    with pytest.raises(ConfigError):
        PrivacyBudget(eps, delta)


EDITS = {
    "deleted": lambda d: d["entries"].pop(1),
    "reordered": lambda d: d["entries"].reverse(),
    "noise": lambda d: d["entries"][2]["event"].update(noise_multiplier=20.0),
    "budget": lambda d: d["budget"].update(epsilon=80.0),
    "chain dropped": lambda d: d["entries"][0].pop("chain"),
    "noise relabelled": lambda d: d.update(noise="private"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_ledger_file_does_not_chain(tmp_path, edit):
    """Each entry hashes the one before it (and the first the client, budget and noise source):
    deleting, reordering or editing an entry, or changing the budget or the noise source, breaks
    the chain on load."""
    ledger = PrivacyLedger("c", BUDGET, noise_source="seeded").check(
        tuple(LedgerEntry.of(r, "counts", gaussian_event(2.0 + r)) for r in range(3))
    )
    path = tmp_path / "c.json"
    ledger.save(path)
    assert PrivacyLedger.load(path) == ledger  # untouched, it loads (negative control)
    data = json.loads(path.read_text())
    EDITS[edit](data)
    path.write_text(json.dumps(data))
    with pytest.raises(PrivacyError, match="does not chain"):
        PrivacyLedger.load(path)


def test_the_noise_source_is_kept_and_an_old_ledger_without_it_loads_as_unknown(tmp_path):
    """A ledger says where its noise came from (hashed into its first link, above). One written
    before the field existed still loads, its chain checked from the old first link, as
    'unknown': the audit fails it (tests/cli/test_audit.py), it does not crash on it."""
    import hashlib

    entries = tuple(LedgerEntry.of(r, "counts", gaussian_event(2.0)) for r in range(2))
    path = tmp_path / "c.json"
    for source in ("private", "seeded"):
        PrivacyLedger("c", BUDGET, entries, noise_source=source).save(path)
        assert PrivacyLedger.load(path).noise_source == source
        assert PrivacyLedger.load(path).project(entries[:1]).noise_source == source
    assert PrivacyLedger("c", BUDGET).noise_source == "unknown"  # a ledger nobody told
    data = json.loads(path.read_text())
    data.pop("noise")
    with pytest.raises(PrivacyError, match="does not chain"):  # the first link held "seeded"
        PrivacyLedger.load(_written(path, data))
    head = {"client": "c", "budget": data["budget"], "adjacency": data["adjacency"]}  # the old first link
    link = hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()
    for record in data["entries"]:
        record.pop("chain")
        link = hashlib.sha256((link + json.dumps(record, sort_keys=True)).encode()).hexdigest()
        record["chain"] = link
    old = PrivacyLedger.load(_written(path, data))
    assert old.noise_source == "unknown" and old.entries == entries
    with pytest.raises(PrivacyError, match="noise source must be one of"):
        PrivacyLedger.load(_written(path, data | {"noise": "os-entropy"}))


def _written(path, data):  # type: ignore[no-untyped-def]
    path.write_text(json.dumps(data))
    return path
