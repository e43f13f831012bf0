"""CKKS layer: parameters, keys, envelopes and additions-only aggregation, with negative controls."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tenseal as ts
from tenseal import sealapi

from securegmi.crypto.aggregation import add_updates, check_update, max_envelope_bytes
from securegmi.crypto.envelope import _header_for, _pack, decrypt, encrypt
from securegmi.crypto.keys import PublicContext, SecretContext
from securegmi.crypto.params import MAX_MODULUS_BITS_128, CkksParameters
from securegmi.crypto.release import release_decrypted
from securegmi.crypto.seal_io import load_ciphertext, save_bytes
from securegmi.errors import CryptoError

PARAMS = CkksParameters()
LENGTH = 6000  # two chunks at N = 4096 (4,096 values each: real and imaginary parts of 2,048 slots)


@pytest.fixture(scope="module")
def keys() -> SecretContext:
    return SecretContext.generate(PARAMS)


@pytest.fixture(scope="module")
def server(keys: SecretContext) -> PublicContext:
    return keys.public()


def _values(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-50, 50, LENGTH)


@pytest.mark.parametrize(
    ("n", "at_bound", "over"),
    [
        (4096, (60, 49), (60, 50)),
        (8192, (60, 40, 58, 60), (60, 40, 59, 60)),
        (16384, (60,) * 6 + (39, 39), (60,) * 6 + (39, 40)),
    ],
)
def test_security_bound_is_enforced_exactly(n, at_bound, over):
    assert sum(at_bound) == MAX_MODULUS_BITS_128[n] and sum(over) == MAX_MODULUS_BITS_128[n] + 1
    CkksParameters(poly_modulus_degree=n, coeff_mod_bit_sizes=at_bound, scale_bits=30, value_bound=1.0)
    with pytest.raises(CryptoError, match="128-bit security"):
        CkksParameters(poly_modulus_degree=n, coeff_mod_bit_sizes=over, scale_bits=30, value_bound=1.0)


def test_headroom_is_checked_against_bound_and_clients():
    with pytest.raises(CryptoError, match="no headroom"):
        CkksParameters(scale_bits=40, value_bound=2.0**15, max_clients=100)  # 40 + 15 + 6.6 + 1 > 60
    with pytest.raises(CryptoError, match="poly_modulus_degree"):
        CkksParameters(poly_modulus_degree=2048, coeff_mod_bit_sizes=(30, 24))


def test_server_context_can_neither_decrypt_nor_encrypt(keys, server):
    assert not server.context.has_secret_key()
    assert check_update(server, encrypt(keys, _values(0)), LENGTH, 10**7)  # it can check and add...
    with pytest.raises(ValueError, match="secret"):  # ...but holds no key to decrypt with
        ts.ckks_vector_from(server.context, ts.ckks_vector(keys.context, [1.0]).serialize()).decrypt()
    with pytest.raises(ValueError, match="encryption"):
        ts.ckks_vector(server.context, [1.0])
    with pytest.raises(CryptoError, match="secret key"):
        PublicContext(keys.context.serialize(save_secret_key=True), PARAMS)


def test_roundtrip_and_aggregate_of_the_maximum_client_count(keys, server):
    clients = {f"c{i}": _values(i) for i in range(PARAMS.max_clients)}
    result = add_updates(server, {c: encrypt(keys, v) for c, v in clients.items()}, LENGTH, 10**7)
    assert len(result.accepted) == PARAMS.max_clients and not result.rejected
    assert result.data is not None
    total = decrypt(keys, result.data)
    error = np.max(np.abs(total - sum(clients.values())))
    assert error <= PARAMS.precision()


def test_another_key_with_the_same_parameters_is_rejected(keys, server):
    other = SecretContext.generate(PARAMS)
    good, foreign = encrypt(keys, _values(1)), encrypt(other, _values(2))
    with pytest.raises(CryptoError, match="another key"):
        check_update(server, foreign, LENGTH, 10**7)
    # Negative control: SEAL alone adds it without complaint, into garbage.
    a = load_ciphertext(server.seal_context, _chunks(good)[0])
    server.evaluator.add_inplace(a, load_ciphertext(server.seal_context, _chunks(foreign)[0]))
    plaintext = sealapi.Plaintext()
    keys.decryptor.decrypt(load_ciphertext(keys.seal_context, save_bytes(a)), plaintext)
    garbage = np.asarray(keys.encoder.decode_double(plaintext))
    assert np.max(np.abs(garbage - (_values(1) + _values(2))[: PARAMS.slot_count])) > 1e6
    # Limit, stated in docs/concepts/threat-model.md: the key id catches honest mistakes (a stale key, another
    # study's key). A client that forges the header passes the structure checks, as it could
    # send any garbage under the right key: a deviating client is a residual risk.
    forged = _pack(_header_for(server, LENGTH), _chunks(foreign))
    assert check_update(server, forged, LENGTH, 10**7)


def _chunks(envelope: bytes) -> list[bytes]:
    from securegmi.crypto.envelope import read_envelope

    return read_envelope(envelope)[1]


def _resized(keys: SecretContext, envelope: bytes, size: int) -> list[bytes]:
    """The envelope's chunks grown to `size` polynomials (an unrelinearised product's shape),
    at the right level and scale."""
    out = []
    for chunk in _chunks(envelope):
        ct = load_ciphertext(keys.seal_context, chunk)
        ct.resize(keys.seal_context, size)
        out.append(save_bytes(ct))
    return out


def _bad_updates(keys: SecretContext, server: PublicContext) -> dict[str, tuple[bytes, str]]:
    """Crafted updates, each with the reason the server must give for refusing it."""
    good = encrypt(keys, _values(3))
    other_n_params = CkksParameters(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60))
    other_n_chunk = _chunks(encrypt(SecretContext.generate(other_n_params), _values(4)))[0]
    low_scale = []
    for i in range(2):
        plaintext = sealapi.Plaintext()
        keys.encoder.encode(_values(5)[i * 2048 : (i + 1) * 2048].tolist(), 2.0**30, plaintext)
        low_scale.append(save_bytes(keys.encryptor.encrypt_symmetric(plaintext)))
    header = _header_for(server, LENGTH)
    max_bytes = max_envelope_bytes(server, LENGTH)
    return {
        "other-key": (encrypt(SecretContext.generate(PARAMS), _values(6)), "another key"),
        # SEAL's load checks a chunk against the context: another ring degree never parses.
        "other-n": (_pack(header, [other_n_chunk, _chunks(good)[1]]), "chunk 0 does not parse"),
        "other-scale": (_pack(header, low_scale), "chunk 0: scale"),
        "three-polynomials": (_pack(header, _resized(keys, good, 3)), "ciphertext size 3 != 2"),
        "missing-chunk": (_pack(header, _chunks(good)[:1]), "declares 2 chunks and holds 1"),
        "truncated": (good[:-500], "does not parse"),
        "oversized": (good + b"\x00" * max_bytes, f"exceeds the {max_bytes}-byte limit"),
        "wrong-length": (encrypt(keys, _values(8)[:100]), "does not match the expected"),
    }


def test_bad_updates_are_rejected_each_for_its_reason_and_the_round_completes(keys, server):
    good = {f"good-{i}": _values(10 + i) for i in range(3)}
    updates = {c: encrypt(keys, v) for c, v in good.items()}
    bad = _bad_updates(keys, server)
    result = add_updates(
        server,
        {**updates, **{c: data for c, (data, _) in bad.items()}},
        LENGTH,
        max_envelope_bytes(server, LENGTH),
    )
    assert sorted(result.accepted) == sorted(good)
    assert {c: reason in result.rejected.get(c, "") for c, (_, reason) in bad.items()} == dict.fromkeys(
        bad, True
    )
    assert result.data is not None
    total = decrypt(keys, result.data)
    assert np.max(np.abs(total - sum(good.values()))) <= PARAMS.precision()


def test_a_ciphertext_below_the_fresh_level_is_rejected():
    """Only reachable with more than one data prime (the shipped set has one): a mod-switched
    chunk has dropped a prime, and adding it to fresh ones would fail or decrypt wrongly."""
    params = CkksParameters(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60))
    keys = SecretContext.generate(params)
    server = keys.public()
    evaluator = sealapi.Evaluator(keys.seal_context)
    switched = []
    for chunk in _chunks(encrypt(keys, _values(1))):
        ct = load_ciphertext(keys.seal_context, chunk)
        evaluator.mod_switch_to_next_inplace(ct)
        switched.append(save_bytes(ct))
    with pytest.raises(CryptoError, match="level 2 is not a fresh ciphertext's"):
        check_update(server, _pack(_header_for(server, LENGTH), switched), LENGTH, 10**7)
    assert check_update(server, encrypt(keys, _values(1)), LENGTH, 10**7)  # a fresh one passes


def test_a_client_refuses_to_decrypt_an_aggregate_under_another_key(keys):
    stranger = SecretContext.generate(PARAMS)
    with pytest.raises(CryptoError, match="under another key"):
        decrypt(keys, encrypt(stranger, _values(2)))


def test_nan_and_out_of_bound_values_are_never_encrypted(keys):
    with pytest.raises(CryptoError, match="NaN"):
        encrypt(keys, np.array([1.0, np.nan]))
    with pytest.raises(CryptoError, match="bound"):
        encrypt(keys, np.array([PARAMS.value_bound * 2]))


def test_key_ceremony_files(tmp_path, keys):
    secret_path, public_path = keys.save(tmp_path / "keys")
    assert secret_path.stat().st_mode & 0o777 == 0o600
    assert PublicContext(public_path.read_bytes(), PARAMS).key_id == keys.key_id
    loaded = SecretContext.load(tmp_path / "keys", PARAMS)
    assert loaded.key_id == keys.key_id
    assert np.allclose(decrypt(loaded, encrypt(keys, _values(9))), _values(9), atol=1e-4)
    with pytest.raises(CryptoError, match="refusing to overwrite"):
        keys.save(tmp_path / "keys")
    os.chmod(secret_path, 0o644)
    with pytest.raises(CryptoError, match="chmod 600"):
        SecretContext.load(tmp_path / "keys", PARAMS)
    assert "secret" not in repr(keys).lower().replace("secretcontext", "")


@pytest.mark.parametrize(
    "params",
    [
        PARAMS,  # the shipped set: N = 4096, one 60-bit data prime, 100 clients
        CkksParameters(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), max_clients=30),
        CkksParameters.for_cohort(1000),  # the set a federation of more than 128 clients gets
    ],
    ids=["shipped", "N8192", "cohort-1000"],
)
def test_the_release_grid_rounds_away_the_noise_of_a_full_cohorts_sum(params):
    """A sum of `max_clients` encryptions at the value bound: the measured error is within the
    parameters' bound, the release grid is at least 100x that bound, and the release of the
    decrypted sum is exactly the release of the true sum: nothing of the key-dependent noise
    (Li & Micciancio 2021) is left in it."""
    keys = SecretContext.generate(params)
    server = keys.public()
    grid = params.release_grid()
    assert grid >= 100 * params.precision()
    rng = np.random.default_rng(7)
    top = int(params.value_bound / grid)
    parts = [rng.integers(-top, top, LENGTH) * grid for _ in range(params.max_clients)]
    result = add_updates(server, {f"c{i}": encrypt(keys, v) for i, v in enumerate(parts)}, LENGTH, 10**8)
    assert result.data is not None
    decrypted = decrypt(keys, result.data)
    exact = np.sum(parts, axis=0)
    error = np.max(np.abs(decrypted - exact))
    assert 0 < error <= params.precision()  # the decryption carries noise, within the bound
    assert np.array_equal(release_decrypted(decrypted, grid), release_decrypted(exact, grid))


def test_a_cohort_beyond_the_shipped_sets_headroom_gets_the_larger_set():
    assert CkksParameters.for_cohort(128) == CkksParameters(max_clients=128)
    with pytest.raises(CryptoError, match="no headroom"):
        CkksParameters(max_clients=129)  # the shipped set would wrap a sum of 129 bound values
    larger = CkksParameters.for_cohort(129)
    assert larger.poly_modulus_degree == 8192 and larger.data_modulus_bits == 100


def test_a_chunk_carries_a_value_in_each_part_of_every_slot(keys, server):
    """Real and imaginary parts both carry values: a full chunk of N values costs about twice
    their float32 bytes (seeded, one 60-bit prime), and both halves decrypt to their values."""
    values = np.random.default_rng(0).uniform(-50, 50, PARAMS.poly_modulus_degree)
    envelope = encrypt(keys, values)
    assert len(_chunks(envelope)) == 1
    assert len(envelope) < 2.1 * 4 * values.size
    decrypted = decrypt(keys, add_updates(server, {"c": envelope}, values.size, 10**7).data or b"")
    assert np.max(np.abs(decrypted - values)) <= PARAMS.precision()


@pytest.mark.parametrize("memory_file", [True, False], ids=["memfd", "private-directory"])
def test_ciphertext_bytes_leave_no_file_and_no_descriptor_behind(keys, monkeypatch, tmp_path, memory_file):
    """Both ways through SEAL's path-only bindings give the same bytes and clean up after
    themselves, also when SEAL refuses what it reads (the fallback is what non-Linux hosts use)."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    if not memory_file:
        monkeypatch.delattr(os, "memfd_create")
    fds = set(os.listdir("/proc/self/fd"))
    plaintext = sealapi.Plaintext()
    keys.encoder.encode([0.25 + 0.5j] * PARAMS.slot_count, PARAMS.scale, plaintext)
    data = save_bytes(keys.encryptor.encrypt_symmetric(plaintext))
    again = save_bytes(load_ciphertext(keys.seal_context, data))
    with pytest.raises(Exception):  # noqa: B017 - SEAL raises its own RuntimeError subclasses
        load_ciphertext(keys.seal_context, data[: len(data) // 2])
    keys.decryptor.decrypt(load_ciphertext(keys.seal_context, again), plaintext)
    assert np.allclose(keys.encoder.decode_complex(plaintext)[:3], 0.25 + 0.5j, atol=1e-6)
    assert list(tmp_path.iterdir()) == []
    assert set(os.listdir("/proc/self/fd")) == fds
