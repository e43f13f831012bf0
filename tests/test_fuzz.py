"""Fuzzed parsers: every reader of bytes that come from another party or from disk, fed random
and mutated inputs, either succeeds or raises its documented error class (a SecureGMIError
subclass). Never another exception, never a hang, never a partial file left behind.

Hypothesis runs derandomised (a fixed seed per test) so CI is reproducible; a local run with
`--hypothesis-seed=random` explores further.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

from securegmi.crypto.aggregation import check_update, max_envelope_bytes
from securegmi.crypto.envelope import encrypt, read_envelope
from securegmi.crypto.keys import SecretContext
from securegmi.crypto.params import CkksParameters
from securegmi.errors import CryptoError, PrivacyError, ProtocolViolation, RunDirectoryError
from securegmi.privacy.events import gaussian_event
from securegmi.privacy.ledger import LedgerEntry, PrivacyBudget, PrivacyLedger
from securegmi.protocol import DpRelease, Message, Public, decode, encode
from securegmi.protocols import plain
from securegmi.records.audit import audit_run
from securegmi.records.trained import load
from securegmi.simulation.runner import run_simulation
from securegmi.simulation.study import Federation
from tests.configs import private_config, small_config

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
PARAMS = CkksParameters(max_clients=4)
KEYS = SecretContext.generate(PARAMS)
LENGTH = 2500


def _mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Valid bytes with a few bytes overwritten, a slice cut out, or cut short; plus raw noise."""
    n = len(valid)

    def overwrite(edits: list[tuple[int, int]]) -> bytes:
        data = bytearray(valid)
        for position, value in edits:
            data[position % n] = value
        return bytes(data)

    edits = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8)
    # The header (8-byte length, then JSON) is where a parser is most exposed: aim there too.
    header = st.lists(st.tuples(st.integers(0, min(n, 400) - 1), st.integers(0, 255)), min_size=1, max_size=4)
    cut = st.tuples(st.integers(0, n), st.integers(0, n)).map(lambda ab: valid[: min(ab)] + valid[max(ab) :])
    return st.one_of(
        edits.map(overwrite),
        header.map(overwrite),
        cut,
        st.integers(0, n).map(lambda k: valid[:k]),
        st.binary(max_size=2048),
    )


def _message() -> Message:
    return Message(
        "update",
        3,
        "client-0",
        {"masses": DpRelease(np.arange(3.0), "counts@round3"), "index": Public(np.arange(3, dtype=np.int64))},
    )


@FUZZ
@given(_mutations(encode(_message())))
def test_message_bytes_decode_or_are_a_protocol_violation(data: bytes) -> None:
    try:
        message = decode(data)
    except ProtocolViolation:
        return
    assert isinstance(message, Message)


SPEC = plain.build(components=3, parameters=5)


@FUZZ
@given(_mutations(encode(Message("start", 0, "server", {}))) | _mutations(encode(_message())))
def test_a_decoded_message_validates_or_is_a_protocol_violation(data: bytes) -> None:
    with contextlib.suppress(ProtocolViolation):
        SPEC.validate(decode(data), sender_role="client", sender="client-0")


ENVELOPE = encrypt(KEYS, np.linspace(-3, 3, LENGTH))


@FUZZ
@given(_mutations(ENVELOPE))
def test_envelopes_parse_and_check_or_are_a_crypto_error(data: bytes) -> None:
    with contextlib.suppress(CryptoError):
        read_envelope(data)
    with contextlib.suppress(CryptoError):
        check_update(KEYS.public(), data, LENGTH, max_envelope_bytes(KEYS.public(), LENGTH))


def _ledger_json() -> dict[str, Any]:
    ledger = PrivacyLedger("client-0", PrivacyBudget(4.0, 1e-5)).check(
        (LedgerEntry.of(0, "counts", gaussian_event(2.0)),)
    )
    return ledger.to_json()


JSON_LEAF = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


def _replace_somewhere(tree: Any, path: list[int], value: Any) -> Any:
    """`tree` with the node that `path` picks (child indices, wrapping) replaced by `value`."""
    if not path or not isinstance(tree, dict | list) or not tree:
        return value
    keys = list(tree) if isinstance(tree, dict) else list(range(len(tree)))
    key = keys[path[0] % len(keys)]
    copy = dict(tree) if isinstance(tree, dict) else list(tree)
    copy[key] = _replace_somewhere(tree[key], path[1:], value)  # type: ignore[index]
    return copy


@FUZZ
@given(st.lists(st.integers(0, 50), max_size=5), JSON)
def test_ledger_json_loads_or_is_a_privacy_error(path: list[int], value: Any) -> None:
    with contextlib.suppress(PrivacyError):
        PrivacyLedger.from_json(_replace_somewhere(_ledger_json(), path, value))


@FUZZ
@given(st.binary(max_size=400) | _mutations(json.dumps(_ledger_json()).encode()))
def test_ledger_files_load_or_are_a_privacy_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("ledger") / "client-0.json"
    path.write_bytes(data)
    with contextlib.suppress(PrivacyError):
        PrivacyLedger.load(path)


STATE_CONFIG = small_config(clients=2, hidden=4, latent=1, rounds=1)


@pytest.fixture(scope="module")
def state_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    federation = Federation.build(STATE_CONFIG)
    path = tmp_path_factory.mktemp("state") / "client-0.safetensors"
    client = federation.client(0, None, state_path=path)
    client.handle(federation.server(None).broadcast(0, 1.0))
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_a_client_state_restores_or_is_a_run_directory_error(
    tmp_path_factory: pytest.TempPathFactory, state_bytes: bytes, data: st.DataObject
) -> None:
    blob = data.draw(_mutations(state_bytes))
    directory = tmp_path_factory.mktemp("restore")
    path = directory / "client-0.safetensors"
    path.write_bytes(blob)
    federation = Federation.build(STATE_CONFIG)
    with contextlib.suppress(RunDirectoryError):
        federation.client(0, None, state_path=path)
    assert sorted(p.name for p in directory.iterdir()) == ["client-0.safetensors"]  # nothing else written
    assert path.read_bytes() == blob  # and the state file untouched


def test_a_state_with_the_wrong_arrays_is_a_run_directory_error(tmp_path: Path) -> None:
    """Well-formed safetensors of the wrong content (a deliberate case beside the fuzzing)."""
    path = tmp_path / "client-0.safetensors"
    path.write_bytes(st_save({"pi": np.zeros((2, 2))}, metadata={"client": "client-0"}))
    with pytest.raises(RunDirectoryError, match="client state"):
        Federation.build(STATE_CONFIG).client(0, None, state_path=path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "dp"
    config = private_config(hidden=4, latent=1, vae_rounds=1)
    run_simulation(config, out=out)
    return out


RUN_FILES = [
    "config.json",
    "protocol.json",
    "dp_plan.json",
    "transcript.jsonl",
    "ledgers/client-1.json",
    "model.safetensors",  # load: only RunDirectoryError, whatever the bytes
]


@settings(FUZZ, max_examples=60)
@given(name=st.sampled_from(RUN_FILES), data=st.data())
def test_audit_and_load_of_a_corrupted_run_directory_are_documented_errors(
    tmp_path_factory: pytest.TempPathFactory, finished_run: Path, name: str, data: st.DataObject
) -> None:
    copy = tmp_path_factory.mktemp("corrupt") / "run"
    shutil.copytree(finished_run, copy)
    (copy / name).write_bytes(data.draw(_mutations((finished_run / name).read_bytes())))
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    try:
        report = audit_run(copy)
        assert isinstance(report.ok, bool)
    except (RunDirectoryError, PrivacyError):
        pass
    with contextlib.suppress(RunDirectoryError):
        load(copy)
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before  # the readers wrote nothing
