"""Additions-only aggregation with the public context, after structure checks per update.

SEAL alone would add a ciphertext under another key with identical parameters, silently, into
garbage; so would a wrong level or scale. Every update is checked before it is added, and
one that fails is rejected with its reason while the others are summed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tenseal import sealapi

from securegmi.crypto.envelope import _header_for, _pack, read_envelope
from securegmi.crypto.keys import PublicContext
from securegmi.crypto.seal_io import load_ciphertext, save_bytes
from securegmi.errors import CryptoError


def check_update(ctx: PublicContext, data: bytes, length: int, max_bytes: int) -> list[sealapi.Ciphertext]:
    """Parse one envelope and check its structure; raise CryptoError with the reason."""
    if len(data) > max_bytes:
        raise CryptoError(f"update of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    header, chunks = read_envelope(data)
    expected = _header_for(ctx, length)
    if header.key_id != ctx.key_id:
        raise CryptoError("ciphertext is under another key (key id mismatch)")
    if header != expected:
        raise CryptoError(f"envelope header {header} does not match the expected {expected}")
    p = ctx.params
    ciphertexts = []
    for i, chunk in enumerate(chunks):
        try:
            # SEAL's load checks the chunk against the context's parameters (another ring
            # degree or modulus chain does not parse), so the checks below are what it allows.
            ct = load_ciphertext(ctx.seal_context, chunk)
        except Exception as exc:
            raise CryptoError(f"chunk {i} does not parse for these parameters: {exc}") from exc
        if ct.coeff_modulus_size() != p.data_primes:
            raise CryptoError(f"chunk {i}: level {ct.coeff_modulus_size()} is not a fresh ciphertext's")
        if ct.scale != p.scale:
            raise CryptoError(f"chunk {i}: scale {ct.scale:g} != 2^{p.scale_bits}")
        if ct.size() != 2:
            raise CryptoError(f"chunk {i}: ciphertext size {ct.size()} != 2")
        ciphertexts.append(ct)
    return ciphertexts


def max_envelope_bytes(ctx: PublicContext, length: int) -> int:
    """Upper bound on an honest envelope's size: fresh ciphertexts are 2 polynomials of N
    coefficients per data prime, 8 bytes each, plus headers (SEAL's zstd only shrinks them)."""
    p = ctx.params
    chunks = _header_for(ctx, length).chunks
    return chunks * (2 * p.poly_modulus_degree * p.data_primes * 8 + 4096) + 4096


def pack_sum(ctx: PublicContext, updates: list[list[sealapi.Ciphertext]], length: int) -> bytes:
    """The envelope of the chunkwise sum of checked updates (additions only)."""
    total = updates[0]
    for ciphertexts in updates[1:]:
        for acc, ct in zip(total, ciphertexts, strict=True):
            ctx.evaluator.add_inplace(acc, ct)
    return _pack(_header_for(ctx, length), [save_bytes(ct) for ct in total])


@dataclass(frozen=True)
class AggregateResult:
    data: bytes | None  # the summed envelope; None when nothing was accepted
    accepted: tuple[str, ...]
    rejected: dict[str, str] = field(default_factory=dict)


def add_updates(
    ctx: PublicContext, updates: Mapping[str, bytes], length: int, max_bytes: int
) -> AggregateResult:
    checked: list[list[sealapi.Ciphertext]] = []
    accepted, rejected = [], {}
    for sender, data in updates.items():
        try:
            checked.append(check_update(ctx, data, length, max_bytes))
        except CryptoError as exc:
            rejected[sender] = str(exc)
            continue
        accepted.append(sender)
    if not checked:
        return AggregateResult(None, (), rejected)
    return AggregateResult(pack_sum(ctx, checked, length), tuple(accepted), rejected)
