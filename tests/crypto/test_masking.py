"""Pairwise masks inside CKKS plaintexts, through real TenSEAL ciphertexts, each property with a
negative control that shows the test catches the broken variant."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from securegmi.crypto import masking
from securegmi.crypto.aggregation import add_updates, max_envelope_bytes
from securegmi.crypto.envelope import decrypt, encrypt
from securegmi.crypto.keys import SecretContext
from securegmi.crypto.masking import (
    CHECK_WORDS,
    ERROR_LIMIT,
    ExpectedCohort,
    FixedPoint,
    MaskContext,
    MaskingKey,
    MaskingParameters,
    MaskRegistry,
    masked_upload,
    prg_words,
    unmask_sum,
)
from securegmi.crypto.params import CkksParameters
from securegmi.crypto.signing import SignerRegistry, SigningKey
from securegmi.errors import CryptoError

from ..secret_walk import secret_holders

MAX_CLIENTS = 6
PARAMS = MaskingParameters.for_cohort(MAX_CLIENTS)
B = PARAMS.word_bits
ENCODING = FixedPoint(word_bits=B, frac_bits=12, value_bound=64.0, max_clients=MAX_CLIENTS)
LENGTH = 6000  # two CKKS chunks at N = 4096
RUN = "run-0123456789abcdef"
CONTEXT = MaskContext(RUN, 3, "moments")


def _cohort_of(keys) -> ExpectedCohort:
    """What each client expects: the whole cohort of the study (here, every key made)."""
    return ExpectedCohort.of((k.client_id for k in keys), MAX_CLIENTS)


@pytest.fixture(scope="module")
def keys() -> SecretContext:
    return SecretContext.generate(PARAMS.ckks)


@pytest.fixture(scope="module")
def cohort() -> list[MaskingKey]:
    return [MaskingKey.generate(f"client-{i}", RUN) for i in range(MAX_CLIENTS)]


def _again(cohort: list[MaskingKey]) -> list[MaskingKey]:
    """The cohort's keys in fresh objects: each test scenario masks as if for the first time
    (a MaskingKey masks once per context)."""
    return [MaskingKey(k.client_id, k.run_id, k._private) for k in cohort]


def _uploads(keys, cohort, values, context=CONTEXT, masked=True, registry=None):
    registry = registry or MaskRegistry.of(cohort)
    uploads = {}
    for key, x in zip(_again(cohort), values, strict=True):
        words = ENCODING.encode(x)
        mask = (
            key.mask(registry, context, words.size + CHECK_WORDS, B, _cohort_of(cohort))
            if masked
            else np.zeros(words.size + CHECK_WORDS, dtype=np.uint64)
        )
        uploads[key.client_id] = encrypt(keys, masked_upload(words, mask, B))
    return uploads


def _sum(keys, uploads):
    server = keys.public()
    result = add_updates(
        server, uploads, LENGTH + CHECK_WORDS, max_envelope_bytes(server, LENGTH + CHECK_WORDS)
    )
    assert not result.rejected
    return decrypt(keys, result.data)


def _values(seed, clients=MAX_CLIENTS):
    return np.random.default_rng(seed).uniform(-64, 64, (clients, LENGTH))


def test_the_shipped_choice_fits_the_cohort_and_its_bound_holds():
    assert PARAMS.ckks.max_clients == MAX_CLIENTS and PARAMS.error_bound() <= ERROR_LIMIT
    assert PARAMS.coefficient_bound() < PARAMS.data_modulus() / 2
    assert MaskingParameters.for_cohort(100).word_bits >= 20  # room for a real encoding at 100 clients


def test_a_full_cohorts_masked_sum_decodes_to_the_exact_sum(keys, cohort):
    values = _values(1)
    decrypted = _sum(keys, _uploads(keys, cohort, values))
    # CKKS's error stays far inside the bound the parameters were admitted on.
    error = float(np.max(np.abs(decrypted - np.rint(decrypted))))
    assert error < PARAMS.error_bound() / 100
    words = unmask_sum(decrypted, PARAMS, _cohort_of(cohort))
    exact = sum(ENCODING.quantise(x) for x in values)
    np.testing.assert_array_equal(ENCODING.signed(words), exact)
    np.testing.assert_allclose(ENCODING.decode(words), values.sum(0), atol=len(cohort) * 2.0**-13)
    # The whole sum twice (a server that adds the aggregate to itself) cancels every mask too.
    # Negative control: its check words read 2n, so a count the server supplies (2n) would
    # accept it and release twice the sum; the count taken from the cohort refuses it.
    doubled = 2 * decrypted
    check = ENCODING.signed(np.rint(doubled[-CHECK_WORDS:]).astype(np.int64).astype(np.uint64))
    np.testing.assert_array_equal(check, 2 * len(cohort))
    with pytest.raises(CryptoError, match="does not unmask"):
        unmask_sum(doubled, PARAMS, _cohort_of(cohort))
    with pytest.raises(CryptoError, match="does not unmask"):
        unmask_sum(doubled, PARAMS, MaskRegistry.of(cohort))
    with pytest.raises(CryptoError, match="beyond the 6 clients"):
        unmask_sum(doubled, PARAMS, ExpectedCohort.of([f"c{i}" for i in range(12)], 2))
    # The rounding refusal on its own: the same sum (check words intact) with one value moved
    # 0.3 off its integer is refused for rounding, not for the check words.
    nudged = decrypted.copy()
    nudged[7] += 0.3
    with pytest.raises(CryptoError, match="from an integer, beyond the parameters' bound"):
        unmask_sum(nudged, PARAMS, _cohort_of(cohort))


def test_parameters_that_cannot_round_exactly_are_refused_and_would_fail(keys, cohort):
    """The refusal is what stands between a low scale and wrong integers: the negative control
    runs the refused set anyway and gets wrong sums."""
    with pytest.raises(CryptoError, match="no headroom"):
        MaskingParameters(dataclasses.replace(PARAMS.ckks, value_bound=2.0**52), B + 4)
    low = CkksParameters(scale_bits=6, value_bound=2.0 ** (B - 1), max_clients=MAX_CLIENTS)
    with pytest.raises(CryptoError, match="round to the wrong integer"):
        MaskingParameters(low, B)
    # Broken variant: bypass the check, encrypt under the scale it refused.
    broken = object.__new__(MaskingParameters)
    object.__setattr__(broken, "ckks", low)
    object.__setattr__(broken, "word_bits", B)
    low_keys = SecretContext.generate(low)
    registry = MaskRegistry.of(cohort)
    values = _values(2)
    uploads = {}
    for key, x in zip(_again(cohort), values, strict=True):
        words = ENCODING.encode(x)
        uploads[key.client_id] = encrypt(
            low_keys,
            masked_upload(
                words, key.mask(registry, CONTEXT, words.size + CHECK_WORDS, B, _cohort_of(cohort)), B
            ),
        )
    decrypted = _sum(low_keys, uploads)
    assert np.max(np.abs(decrypted - np.rint(decrypted))) > 0.25  # values land between integers
    with pytest.raises(CryptoError, match="from an integer, beyond the parameters' bound"):
        unmask_sum(decrypted, broken, _cohort_of(cohort))


def _word_stats(words_a: np.ndarray, words_b: np.ndarray) -> float:
    """The smallest p-value of: chi-square uniformity of the high and the low 6 bits of each
    sample, and a two-sample KS test between the samples (as fractions of 2^b)."""
    pvalues = []
    for w in (words_a, words_b):
        for bits in (w >> np.uint64(B - 6), w & np.uint64(63)):
            pvalues.append(stats.chisquare(np.bincount(bits.astype(np.int64), minlength=64)).pvalue)
    pvalues.append(stats.ks_2samp(words_a / 2.0**B, words_b / 2.0**B, method="asymp").pvalue)
    return min(pvalues)


def _single_upload_words(keys, cohort, values, masked):
    """What the key holder sees when it decrypts client 0's upload alone."""
    upload = _uploads(keys, cohort, values, masked=masked)["client-0"]
    decrypted = decrypt(keys, upload)
    return np.rint(decrypted).astype(np.int64).astype(np.uint64) & np.uint64(2**B - 1)


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "negative-control-unmasked"])
def test_a_single_decrypted_upload_is_independent_of_the_values(keys, cohort, masked):
    zeros = np.zeros((MAX_CLIENTS, LENGTH))
    extreme = np.where(np.arange(LENGTH) % 2, 64.0, -64.0) * np.ones((MAX_CLIENTS, 1))
    words_a = _single_upload_words(keys, cohort, zeros, masked)
    words_b = _single_upload_words(keys, cohort, extreme, masked)
    smallest = _word_stats(words_a, words_b)
    if masked:
        assert smallest > 1e-4  # five tests at 1e-4: a chance failure about once in 2,000 runs
    else:
        assert smallest < 1e-12  # the same test sees the values at once without masks


def test_a_sum_short_of_a_client_or_with_one_twice_is_refused(keys, cohort):
    values = _values(3)
    uploads = _uploads(keys, cohort, values)
    short = {k: v for k, v in uploads.items() if k != "client-2"}
    decrypted = _sum(keys, short)
    with pytest.raises(CryptoError, match="does not unmask"):
        unmask_sum(decrypted, PARAMS, ExpectedCohort.of(short, len(short)))
    with pytest.raises(CryptoError, match="does not unmask"):
        unmask_sum(decrypted, PARAMS, _cohort_of(cohort))
    # Negative control: without the check words the short sum would decode, silently wrong.
    words = np.rint(decrypted[:-CHECK_WORDS]).astype(np.int64).astype(np.uint64)
    present = sum(ENCODING.quantise(x) for i, x in enumerate(values) if i != 2)
    assert np.mean(ENCODING.signed(words) == present) < 1e-3
    doubled = {**uploads, "again": uploads["client-0"]}
    with pytest.raises(CryptoError, match="does not unmask"):
        unmask_sum(_sum(keys, doubled), PARAMS, _cohort_of(cohort))


def _unrelated(a: np.ndarray, b: np.ndarray) -> bool:
    """Two masks share no more words than chance (expected length 2^-b) and no correlation."""
    same = int(np.sum(a == b))
    r = np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1]
    return same <= 3 and abs(r) < 5 / np.sqrt(a.size)


@pytest.mark.parametrize(
    ("other", "field"),
    [
        (MaskContext("run-another", 3, "moments"), "run_id"),
        (MaskContext(RUN, 4, "moments"), "round"),
        (MaskContext(RUN, 3, "cluster_stats"), "stage"),
    ],
    ids=["run", "round", "stage"],
)
def test_masks_are_bound_to_their_run_round_and_stage(cohort, other, field, monkeypatch):
    def masks() -> tuple[np.ndarray, np.ndarray]:
        registry = MaskRegistry(other.run_id, {k.client_id: k.public_bytes for k in cohort})
        key = MaskingKey(cohort[0].client_id, other.run_id, cohort[0]._private)
        return _again(cohort)[0].mask(
            MaskRegistry.of(cohort), CONTEXT, LENGTH, B, _cohort_of(cohort)
        ), key.mask(registry, other, LENGTH, B, _cohort_of(cohort))

    assert _unrelated(*masks())
    # Negative control: an info string that forgets the field replays the masks.
    original = masking._info

    def forgetful(context, low, high, roster):
        return original(dataclasses.replace(context, **{field: getattr(CONTEXT, field)}), low, high, roster)

    monkeypatch.setattr(masking, "_info", forgetful)
    assert not _unrelated(*masks())


def test_an_upload_masked_for_another_round_does_not_unmask(keys, cohort):
    values = _values(4)
    uploads = _uploads(keys, cohort, values)
    uploads["client-1"] = _uploads(keys, cohort, values, context=MaskContext(RUN, 2, "moments"))["client-1"]
    with pytest.raises(CryptoError, match="does not unmask"):
        unmask_sum(_sum(keys, uploads), PARAMS, _cohort_of(cohort))


def test_both_ends_of_a_pair_derive_one_seed_and_pairs_differ(cohort):
    a, b, c = cohort[:3]
    r = MaskRegistry.of(cohort).digest()
    assert a.seed(b.client_id, b.public_bytes, CONTEXT, r) == b.seed(a.client_id, a.public_bytes, CONTEXT, r)
    assert a.seed(b.client_id, b.public_bytes, CONTEXT, r) != a.seed(c.client_id, c.public_bytes, CONTEXT, r)
    total = sum(
        (k.mask(MaskRegistry.of(cohort), CONTEXT, 1000, B, _cohort_of(cohort)) for k in _again(cohort)),
        np.zeros(1000, dtype=np.uint64),
    )
    np.testing.assert_array_equal(total & np.uint64(2**B - 1), 0)  # the masks cancel
    with pytest.raises(CryptoError, match="unusable"):
        a.seed("evil", bytes(32), CONTEXT, r)  # a low-order point gives an all-zero secret
    with pytest.raises(CryptoError, match="fresh per run"):
        a.seed(b.client_id, b.public_bytes, MaskContext("run-other", 0, "moments"), r)


def test_a_mask_is_used_once(keys, cohort):
    """Negative control first: two uploads under one mask (a client that reused it) give the key
    holder the difference of their values in the clear; the key refuses a second mask."""
    registry = MaskRegistry.of(cohort)
    x, y = _values(6, 2)
    seen = []
    for values in (x, y):
        key = _again(cohort)[0]  # the same key material, no memory of the first mask
        words = ENCODING.encode(values)
        mask = key.mask(registry, CONTEXT, words.size + CHECK_WORDS, B, _cohort_of(cohort))
        seen.append(np.rint(decrypt(keys, encrypt(keys, masked_upload(words, mask, B)))).astype(np.int64))
    leaked = ENCODING.signed((seen[0] - seen[1]).astype(np.uint64))[:LENGTH]
    np.testing.assert_array_equal(leaked, ENCODING.quantise(x) - ENCODING.quantise(y))
    key = _again(cohort)[0]
    key.mask(registry, CONTEXT, 10, B, _cohort_of(cohort))
    with pytest.raises(CryptoError, match="used once"):
        key.mask(registry, CONTEXT, 10, B, _cohort_of(cohort))
    key.mask(
        registry, MaskContext(RUN, CONTEXT.round + 1, CONTEXT.stage), 10, B, _cohort_of(cohort)
    )  # the next round


def test_the_prg_is_chacha20_keystream_reduced_mod_2_to_the_b():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    seed = bytes(range(32))
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(80))
    expected = np.frombuffer(stream, dtype="<u8") & np.uint64(2**20 - 1)
    np.testing.assert_array_equal(prg_words(seed, 10, 20), expected)


def test_masking_private_keys_never_reach_the_server(keys, cohort):
    """Everything the server holds or relays: the registry (and its JSON), the uploads and the
    sum. Negative control: the same walk finds a key or its bytes put where the server reads."""
    registry = MaskRegistry.of(cohort)
    uploads = _uploads(keys, cohort, _values(5), registry=registry)
    server = keys.public()
    result = add_updates(
        server, uploads, LENGTH + CHECK_WORDS, max_envelope_bytes(server, LENGTH + CHECK_WORDS)
    )
    private = tuple(k._private.private_bytes_raw() for k in cohort)
    server_side = {
        "registry": registry,
        "json": str(registry.to_json()).encode(),
        "uploads": uploads,
        "sum": result,
    }
    assert secret_holders(server_side, private) == []
    assert all(p.hex()[:12] not in repr(k) for p, k in zip(private, cohort, strict=True))
    assert secret_holders({**server_side, "leak": cohort[1]}, private) == ["root['leak']: MaskingKey"]
    assert secret_holders({"blob": b"x" + private[2] + b"y"}, private) == ["root['blob']: bytes"]


def test_fixed_point_encoding_round_trips_signed_sums_and_refuses_what_would_wrap():
    x = np.array([-64.0, -1.5, 0.0, 2.0**-13, 63.999])
    np.testing.assert_allclose(ENCODING.decode(ENCODING.encode(x)), x, atol=2.0**-13)
    total = (ENCODING.encode(x) + ENCODING.encode(x)) & np.uint64(2**B - 1)
    np.testing.assert_allclose(ENCODING.decode(total), 2 * x, atol=2.0**-12)
    with pytest.raises(CryptoError, match="exceeds the declared bound"):
        ENCODING.encode(np.array([64.5]))
    with pytest.raises(CryptoError, match="NaN"):
        ENCODING.encode(np.array([np.nan]))
    with pytest.raises(CryptoError, match="beyond a"):
        FixedPoint(word_bits=B, frac_bits=B - 6, value_bound=64.0, max_clients=MAX_CLIENTS)
    with pytest.raises(CryptoError, match="beyond a"):
        FixedPoint(
            word_bits=B, frac_bits=12, value_bound=64.0, max_clients=MAX_CLIENTS, headroom=2 ** (B - 1)
        )


def test_announced_keys_verify_and_a_substituted_key_is_refused(cohort):
    """The server relays the masking keys. Negative control: if it could substitute its own for
    every peer of client 0 (unverified), it would share, and so know, all of client 0's seeds,
    and recompute client 0's mask exactly; the signed announcements refuse the substitution."""
    signing = {k.client_id: SigningKey.generate(k.client_id) for k in cohort}
    signers = SignerRegistry.of(signing)
    announced = [k.announce(signing[k.client_id]) for k in cohort]
    assert dict(MaskRegistry.verified(RUN, announced, signers)._keys) == dict(MaskRegistry.of(cohort)._keys)
    fakes = {k.client_id: MaskingKey.generate(k.client_id, RUN) for k in cohort[1:]}  # the server's
    forged = [announced[0]] + [
        dataclasses.replace(a, public_bytes=fakes[a.client_id].public_bytes) for a in announced[1:]
    ]
    victim_view = MaskRegistry(RUN, {a.client_id: a.public_bytes for a in forged})
    victim_mask = _again(cohort)[0].mask(victim_view, CONTEXT, 1000, B, _cohort_of(cohort))
    recomputed = np.zeros(1000, dtype=np.uint64)
    for fake in fakes.values():
        seed = fake.seed("client-0", cohort[0].public_bytes, CONTEXT, victim_view.digest())
        words = prg_words(seed, 1000, B)
        recomputed = recomputed + words if fake.client_id > "client-0" else recomputed - words
    np.testing.assert_array_equal(recomputed & np.uint64(2**B - 1), victim_mask)  # the attack works
    with pytest.raises(CryptoError, match="client-1's masking key is refused"):
        MaskRegistry.verified(RUN, forged, signers)
    with pytest.raises(CryptoError, match="another run"):
        MaskRegistry.verified("run-other", announced, signers)
    with pytest.raises(CryptoError, match="own signing key"):
        cohort[0].announce(signing["client-1"])
    # An announcement for another run, re-labelled: its signature covers the run, so it fails.
    other = MaskingKey(cohort[1].client_id, "run-other", cohort[1]._private).announce(signing["client-1"])
    with pytest.raises(CryptoError, match="refused"):
        MaskRegistry.verified(RUN, [announced[0], dataclasses.replace(other, run_id=RUN)], signers)


def test_a_registry_that_is_not_the_expected_cohort_is_refused(keys, cohort, monkeypatch):
    """A server relays to client 0 only the signed announcements of client 0 and client 1: they
    verify, but client 0's mask is then PRG(s_01) alone, which client 1 (holding the CKKS key)
    strips. Negative control: with the cohort check bypassed, client 1 reads client 0's values
    exactly; with it, client 0 refuses to mask."""
    signing = {k.client_id: SigningKey.generate(k.client_id) for k in cohort}
    signers = SignerRegistry.of(signing)
    announced = [k.announce(signing[k.client_id]) for k in cohort]
    subset = MaskRegistry.verified(RUN, announced[:2], signers)  # genuine, but two of six
    expected = ExpectedCohort.of(signers, MAX_CLIENTS)  # the client's own list of the study
    x = _values(7, 1)[0]
    words = ENCODING.encode(x)
    n = words.size + CHECK_WORDS

    def attack() -> np.ndarray:
        upload = masked_upload(words, _again(cohort)[0].mask(subset, CONTEXT, n, B, expected), B)
        seen = np.rint(decrypt(keys, encrypt(keys, upload))).astype(np.int64).astype(np.uint64)
        seed = cohort[1].seed("client-0", cohort[0].public_bytes, CONTEXT, subset.digest())
        return ENCODING.signed((seen - prg_words(seed, n, B)) & np.uint64(2**B - 1))[:-CHECK_WORDS]

    with pytest.raises(CryptoError, match="not the expected cohort"):
        attack()
    with monkeypatch.context() as m:
        m.setattr(masking, "_check_cohort", lambda registry, cohort: None)
        np.testing.assert_array_equal(attack(), ENCODING.quantise(x))  # the attack works unchecked
    # A superset (a server's extra member) is refused too, and so is a cohort below the minimum.
    extra = MaskRegistry(RUN, {**dict(MaskRegistry.of(cohort)._keys), "server-sybil": bytes(range(32))})
    with pytest.raises(CryptoError, match="unexpected \\['server-sybil'\\]"):
        _again(cohort)[0].mask(extra, CONTEXT, n, B, expected)
    with pytest.raises(CryptoError, match="below the declared minimum"):
        ExpectedCohort.of(["client-0", "client-1"], MAX_CLIENTS)


def test_clients_shown_different_registries_do_not_unmask(keys, cohort, monkeypatch):
    """Client 5 signed two masking keys (or the server holds two); clients 0-2 are shown one,
    3-5 the other. Every seed binds the registry's digest, so even the pairs both views agree
    on derive different seeds and the sum is refused. Negative control: without the digest in
    the info, a pair inside the split (client 0, client 1 vs client 3) shares its seed."""
    second = MaskingKey.generate("client-5", RUN)
    view_a = MaskRegistry.of(cohort)
    view_b = MaskRegistry.of([*cohort[:5], second])
    assert view_a.digest() != view_b.digest()
    expected = _cohort_of(cohort)
    values = _values(8)
    fresh = [*_again(cohort)[:5], second]
    uploads = {}
    for i, (key, x) in enumerate(zip(fresh, values, strict=True)):
        w = ENCODING.encode(x)
        view = view_a if i < 3 else view_b
        uploads[key.client_id] = encrypt(
            keys, masked_upload(w, key.mask(view, CONTEXT, w.size + CHECK_WORDS, B, expected), B)
        )
    with pytest.raises(CryptoError, match="does not unmask"):
        unmask_sum(_sum(keys, uploads), PARAMS, _cohort_of(cohort))
    a, d = cohort[0], cohort[3]
    assert a.seed(d.client_id, d.public_bytes, CONTEXT, view_a.digest()) != d.seed(
        a.client_id, a.public_bytes, CONTEXT, view_b.digest()
    )
    original = masking._info
    monkeypatch.setattr(masking, "_info", lambda c, low, high, roster: original(c, low, high, ""))
    assert a.seed(d.client_id, d.public_bytes, CONTEXT, view_a.digest()) == d.seed(
        a.client_id, a.public_bytes, CONTEXT, view_b.digest()
    )


def test_a_word_that_holds_one_value_but_not_the_cohorts_sum_is_refused():
    """At step 2^-(b-9) a value of magnitude 64 takes 2^(b-3): one fits the b-bit word, six
    reach 1.5 2^(b-1). Negative control: the same grid admitted for one client (the check
    counting a single value) lets six values of 63.9 wrap to a negative sum."""
    frac = B - 9
    single = FixedPoint(word_bits=B, frac_bits=frac, value_bound=64.0, max_clients=1)
    assert single.max_integer < 2 ** (B - 1) <= MAX_CLIENTS * single.max_integer
    with pytest.raises(CryptoError, match=f"a sum of {MAX_CLIENTS} values"):
        FixedPoint(word_bits=B, frac_bits=frac, value_bound=64.0, max_clients=MAX_CLIENTS)
    values = np.full((MAX_CLIENTS, 3), 63.9)
    total = sum((single.encode(x) for x in values), np.zeros(3, dtype=np.uint64)) & np.uint64(2**B - 1)
    assert np.all(single.decode(total) < 0)  # 383.4 decodes with the wrong sign
    fits = FixedPoint(word_bits=B, frac_bits=frac - 3, value_bound=64.0, max_clients=MAX_CLIENTS)
    total = sum((fits.encode(x) for x in values), np.zeros(3, dtype=np.uint64)) & np.uint64(2**B - 1)
    np.testing.assert_allclose(fits.decode(total), MAX_CLIENTS * 63.9, atol=MAX_CLIENTS * 2.0 ** -(frac - 3))
