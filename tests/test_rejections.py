"""Every rejection branch of the crypto, privacy and protocol vocabularies that the behaviour
tests do not already reach, reached with a crafted input and refused with its own reason
(branch coverage is measured over these packages: docs/testing.md, "Every rejection
reached")."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import tenseal as ts

from securegmi.crypto.aggregation import add_updates
from securegmi.crypto.keys import PublicContext, SecretContext
from securegmi.crypto.params import CkksParameters
from securegmi.crypto.release import release_decrypted
from securegmi.errors import ConfigError, CryptoError, PrivacyError, ProtocolViolation
from securegmi.privacy.calibration import calibrate, calibrate_private_mixture, plan_from_dict
from securegmi.privacy.dpsgd import DpSgdConfig
from securegmi.privacy.events import event_to_json
from securegmi.privacy.ledger import PrivacyBudget, PrivacyLedger
from securegmi.protocol import Ciphertext, DpRelease, FieldKind, FieldSpec, StageSpec
from securegmi.protocol.payload import build_payload
from securegmi.protocols import secure

PARAMS = CkksParameters(max_clients=4)
KEYS = SecretContext.generate(PARAMS)
BUDGET = PrivacyBudget(4.0, 1e-5)
STAGE = StageSpec(
    "update",
    "client",
    (
        FieldSpec("c", FieldKind.CIPHERTEXT, (3,), "float64", "encrypted"),
        FieldSpec("d", FieldKind.DP_RELEASE, (3,), "float64", "released"),
    ),
)


def _load_secret_from(tmp: Path, secret: bytes) -> SecretContext:
    (tmp / "secret.ckks").write_bytes(secret)
    (tmp / "secret.ckks").chmod(0o600)
    (tmp / "public.ckks").write_bytes(KEYS.public_bytes)
    return SecretContext.load(tmp, PARAMS)


def _private_plan(**change: float) -> object:
    settings = {"vae_rounds": 1, "statistics_share": 0.5} | change
    return calibrate_private_mixture(
        BUDGET,
        statistics=None,  # type: ignore[arg-type]  # refused before it is read
        steps_per_round=1,
        sample_rate=0.5,
        clip_norm=1.0,
        **settings,  # type: ignore[arg-type]
    )


CASES: dict[str, tuple[Callable[[Path], object], type[Exception], str]] = {
    # crypto
    "public context that does not parse": (
        lambda _: PublicContext(b"not a context", PARAMS),
        CryptoError,
        "do not parse",
    ),
    "secret context without its key": (
        lambda _: SecretContext(ts.context_from(KEYS.public_bytes), PARAMS, KEYS.public_bytes),
        CryptoError,
        "needs its secret key",
    ),
    "key directory without its files": (
        lambda tmp: SecretContext.load(tmp, PARAMS),
        CryptoError,
        "needs both secret.ckks and public.ckks",
    ),
    "secret file that is not a context": (
        lambda tmp: _load_secret_from(tmp, b"garbage"),
        CryptoError,
        "is not a secret CKKS context",
    ),
    "prime out of range": (
        lambda _: CkksParameters(coeff_mod_bit_sizes=(60, 19)),
        CryptoError,
        "each of 20 to 60 bits",
    ),
    "no client": (lambda _: CkksParameters(max_clients=0), CryptoError, "max_clients at least 1"),
    "scale above the special prime": (
        lambda _: CkksParameters(coeff_mod_bit_sizes=(60, 30), scale_bits=40, value_bound=1.0, max_clients=1),
        CryptoError,
        "must not exceed the special prime",
    ),
    "release grid of zero": (lambda _: release_decrypted(np.ones(2), 0.0), CryptoError, "must be positive"),
    # privacy
    "negative noise": (lambda _: DpSgdConfig(-1.0, 1.0, 0.5, 1.0), ConfigError, "noise_multiplier"),
    "sample rate above 1": (lambda _: DpSgdConfig(1.0, 1.0, 1.5, 1.0), ConfigError, "sample_rate"),
    "zero normaliser": (lambda _: DpSgdConfig(1.0, 1.0, 0.5, 0.0), ConfigError, "batch_normaliser"),
    "plan of no rounds": (
        lambda _: calibrate(BUDGET, rounds=0, steps_per_round=1, sample_rate=0.5, clip_norm=1.0),
        ConfigError,
        "at least one round",
    ),
    "plan with sample rate 0": (
        lambda _: calibrate(BUDGET, rounds=1, steps_per_round=1, sample_rate=0.0, clip_norm=1.0),
        ConfigError,
        "sample_rate",
    ),
    "plan giving the counts everything": (
        lambda _: calibrate(
            BUDGET, rounds=1, steps_per_round=1, sample_rate=0.5, clip_norm=1.0, count_share=1.0
        ),
        ConfigError,
        "count_share",
    ),
    "private plan of no DP-SGD": (
        lambda _: _private_plan(vae_rounds=0),
        ConfigError,
        "at least one DP-SGD round",
    ),
    "private plan giving the statistics everything": (
        lambda _: _private_plan(statistics_share=1.0),
        ConfigError,
        "statistics_share",
    ),
    "plan file of another shape": (
        lambda _: plan_from_dict({"epsilon": 1.0}),
        ConfigError,
        "not a privacy plan",
    ),
    "event without a ledger form": (
        lambda _: event_to_json(dp_accounting.LaplaceDpEvent(1.0)),
        PrivacyError,
        "has no ledger form",
    ),
    "ledger without entries": (
        lambda _: PrivacyLedger.from_json({"client": "c", "budget": {"epsilon": 1, "delta": 1e-5}}),
        PrivacyError,
        "malformed ledger",
    ),
    "release its ledger does not cover": (
        lambda _: PrivacyLedger("c", BUDGET).declared(["counts@round0"]),
        PrivacyError,
        "no ledger entry covers counts@round0; nothing was sent",
    ),
    # protocol vocabulary
    "non-numeric field": (lambda _: DpRelease(np.array(["a"]), "e@round0"), ProtocolViolation, "numeric"),
    "ciphertext without a key id": (lambda _: Ciphertext(b"x", ""), ProtocolViolation, "non-empty key id"),
    "declared field without a value": (
        lambda _: build_payload(STAGE, {"d": np.zeros(3)}, {"d": "e"}, key_id="k"),
        ProtocolViolation,
        "no value for declared field 'c'",
    ),
    "ciphertext field given an array": (
        lambda _: build_payload(STAGE, {"c": np.zeros(3), "d": np.zeros(3)}, {"d": "e"}, key_id="k"),
        ProtocolViolation,
        "must be ciphertext bytes under a key",
    ),
    "array field given bytes": (
        lambda _: build_payload(STAGE, {"c": b"x", "d": b"y"}, {"d": "e"}, key_id="k"),
        ProtocolViolation,
        "is declared dp-release, got bytes",
    ),
    "undeclared field required": (lambda _: STAGE.require("z"), ProtocolViolation, "declares no field 'z'"),
    "no server stage after an uplink": (
        lambda _: secure.build(components=3, parameters=4).downlink_after("start"),
        ProtocolViolation,
        "declares no server stage after 'start'",
    ),
    "unbound dimension": (
        lambda _: secure.build(components=3, parameters=4).resolve(("Q",)),
        ProtocolViolation,
        "dimension 'Q' is not bound",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_rejection_is_reached_with_its_reason(case, tmp_path):
    make, error, reason = CASES[case]
    with pytest.raises(error, match=reason):
        make(tmp_path)


def test_an_aggregate_of_only_rejected_updates_is_empty():
    result = add_updates(KEYS.public(), {"a": b"junk", "b": b"more junk"}, 3, 10**6)
    assert result.data is None and result.accepted == () and set(result.rejected) == {"a", "b"}


def test_a_ledger_file_is_read_whole_or_refused(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps({"client": "c", "budget": {"epsilon": "x", "delta": 1e-5}, "entries": []}))
    with pytest.raises(PrivacyError):
        PrivacyLedger.load(path)
