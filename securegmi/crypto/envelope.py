"""Ciphertext envelopes: a flat float vector as CKKS chunks, with the key id, parameters and
layout in a header (safetensors: data only, no executable objects).

Each chunk is a SEAL ciphertext of N/2 complex slots carrying N real values: the first N/2 in
the real parts, the next N/2 in the imaginary parts. CKKS slots are complex and addition acts
on both parts independently, so a real-only encoding leaves half of every ciphertext unused;
this packing halves the bytes and the encryptions per value (bench/he_cost.py: 2.0 instead of
4.0 bytes per float32 byte at N=4096) at the same error, since encoding and encryption noise
land on both parts of a slot alike. Fresh uploads are seeded symmetric ciphertexts (see
seal_io). Chunking is ours: a per-chunk layout is what the server must check anyway.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from tenseal import sealapi

from securegmi.crypto.keys import PublicContext, SecretContext
from securegmi.crypto.seal_io import load_ciphertext, save_bytes
from securegmi.errors import CryptoError

_META = "securegmi.ckks"
VALUES_PER_SLOT = 2


@dataclass(frozen=True)
class EnvelopeHeader:
    key_id: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    length: int  # number of plaintext values
    chunks: int
    values_per_slot: int  # 2: real and imaginary parts (a header without it is another format)


def _header_for(ctx: SecretContext | PublicContext, length: int) -> EnvelopeHeader:
    p = ctx.params
    return EnvelopeHeader(
        ctx.key_id,
        p.poly_modulus_degree,
        tuple(p.coeff_mod_bit_sizes),
        p.scale_bits,
        length,
        max(1, math.ceil(length / (VALUES_PER_SLOT * p.slot_count))),
        VALUES_PER_SLOT,
    )


def _pack(header: EnvelopeHeader, chunks: list[bytes]) -> bytes:
    arrays = {f"c{i:05d}": np.frombuffer(c, dtype=np.uint8) for i, c in enumerate(chunks)}
    meta = {**header.__dict__, "coeff_mod_bit_sizes": list(header.coeff_mod_bit_sizes)}
    return bytes(st_save(arrays, metadata={_META: json.dumps(meta, sort_keys=True)}))


def read_envelope(data: bytes) -> tuple[EnvelopeHeader, list[bytes]]:
    try:
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8 : 8 + size])["__metadata__"][_META])
        header = EnvelopeHeader(
            str(meta["key_id"]),
            int(meta["poly_modulus_degree"]),
            tuple(int(b) for b in meta["coeff_mod_bit_sizes"]),
            int(meta["scale_bits"]),
            int(meta["length"]),
            int(meta["chunks"]),
            int(meta["values_per_slot"]),
        )
        arrays = st_load(data)
    except Exception as exc:
        raise CryptoError(f"ciphertext envelope does not parse: {exc}") from exc
    chunks = [arrays[k].tobytes() for k in sorted(arrays)]
    if len(chunks) != header.chunks:
        raise CryptoError(f"envelope declares {header.chunks} chunks and holds {len(chunks)}")
    return header, chunks


def encrypt(ctx: SecretContext, values: np.ndarray) -> bytes:
    """Encrypt a flat vector; refuses non-finite values and values beyond the declared bound."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(flat)):
        raise CryptoError("refusing to encrypt NaN or infinity: it would poison the whole aggregate")
    bound = ctx.params.value_bound
    if flat.size and np.max(np.abs(flat)) > bound:
        raise CryptoError(
            f"a value of magnitude {np.max(np.abs(flat)):.3g} exceeds the declared bound {bound:g}: "
            "the encrypted sum could wrap around the modulus"
        )
    header = _header_for(ctx, flat.size)
    slots = ctx.params.slot_count
    padded = np.zeros(header.chunks * VALUES_PER_SLOT * slots)
    padded[: flat.size] = flat
    chunks = []
    for real, imaginary in padded.reshape(header.chunks, VALUES_PER_SLOT, slots):
        plaintext = sealapi.Plaintext()
        ctx.encoder.encode((real + 1j * imaginary).tolist(), ctx.params.scale, plaintext)
        chunks.append(save_bytes(ctx.encryptor.encrypt_symmetric(plaintext)))
    return _pack(header, chunks)


def decrypt(ctx: SecretContext, data: bytes) -> np.ndarray:
    header, chunks = read_envelope(data)
    if header.key_id != ctx.key_id:
        raise CryptoError("this aggregate is under another key than this client's")
    if header != _header_for(ctx, header.length):
        raise CryptoError(f"envelope header {header} does not match this context's layout")
    parts = []
    for chunk in chunks:
        plaintext = sealapi.Plaintext()
        ctx.decryptor.decrypt(load_ciphertext(ctx.seal_context, chunk), plaintext)
        slots = np.asarray(ctx.encoder.decode_complex(plaintext))
        parts += [slots.real, slots.imag]
    return np.concatenate(parts)[: header.length]
