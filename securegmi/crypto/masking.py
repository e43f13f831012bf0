"""Pairwise masks inside the CKKS plaintexts (Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017), so that whoever holds the shared CKKS key and
decrypts ONE upload sees words uniform modulo 2^b, whatever the client's values.

Each client holds an X25519 key pair per run (`MaskingKey`); only the public halves are
registered (`MaskRegistry`), each signed with the client's Ed25519 key (`MaskRegistry.verified`:
unsigned keys would let the server that relays them substitute its own and know every seed).
For every round and stage each pair (i, j) derives one seed by HKDF-SHA256 over its X25519
shared secret, with an info string that binds the domain, the run id, the two client ids in
order, the round, the stage and the digest of the whole registry (sorted ids and keys): a seed
never serves two runs, rounds, stages, pairs or views of the cohort. A client masks only over a
registry that is exactly the cohort it expects (`ExpectedCohort`, from the study's signer
registry): a server-chosen subset would leave its mask to the few peers in it.
ChaCha20 (a keystream over zeros) expands a seed into 64-bit words, reduced modulo 2^b (2^b
divides 2^64, so the low b bits of a uniform word are uniform). Client i adds

    mask_i = sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)   (mod 2^b, ids in sorted order)

to its fixed-point encoded values (`FixedPoint`): over the whole cohort the masks cancel, so the
decrypted sum of all uploads is the sum of the values modulo 2^b. A sum missing any client keeps
that client's pairs' masks and is uniform garbage: `CHECK_WORDS` words of value 1 in every
upload unmask to the number of contributors only when every mask cancelled (`unmask_sum`),
otherwise the sum is refused, never decoded.

CKKS carries the masked words, centred to [-2^(b-1), 2^(b-1)), as approximate numbers;
`MaskingParameters` refuses a parameter set unless the decrypted sum of `max_clients` uploads is
provably within `ERROR_LIMIT` (< 1/2) of the exact integer, and the integer fits the modulus.

Dropout recovery (Shamir shares of the seeds) is not here: a sum short of a client is refused.
The cryptography package supplies X25519, HKDF and ChaCha20; only the cancellation and the
encoding are ours.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from tenseal import sealapi

from securegmi.crypto.params import CkksParameters
from securegmi.crypto.signing import SignerRegistry, SigningKey, statement
from securegmi.errors import CryptoError

MASK_DOMAIN = "securegmi/pairwise-mask/v1"
ANNOUNCEMENT_DOMAIN = "securegmi/masking-key/v1"
_KEY_BYTES = 32
_NONCE = bytes(16)  # one key per (pair, run, round, stage): a fixed nonce never repeats a keystream
CHECK_WORDS = 4  # words of value 1 per upload: a sum short of a client unmasks them to garbage
# SEAL's fresh-encryption noise is a centred binomial of 42 coin flips: every coefficient's
# error is in [-21, 21] (SEAL's sample_poly_cbd); encoding rounds each coefficient once more
# (<= 1/2).
SEAL_NOISE_MAX = 21
# The decrypted sum must be within this of its integer: 1/8, a factor 4 below the 1/2 at which
# rounding could pick the wrong integer, on top of a worst-case (not typical) error bound.
ERROR_LIMIT = 0.125
_DOUBLE_EPSILON = 2.0**-52
VALUES_PER_SLOT = 2  # the envelope packs a real and an imaginary part into every slot


@dataclass(frozen=True)
class MaskContext:
    """What a mask is for: its run, round and stage. Bound into every seed (replay protection)."""

    run_id: str
    round: int
    stage: str

    def __post_init__(self) -> None:
        if not (isinstance(self.run_id, str) and self.run_id and isinstance(self.stage, str) and self.stage):
            raise CryptoError("a mask context needs a non-empty run id and stage")
        if not (isinstance(self.round, int) and self.round >= 0):
            raise CryptoError(f"a mask context's round is a non-negative integer, got {self.round!r}")


@dataclass(frozen=True)
class ExpectedCohort:
    """The client ids a mask must run over, as the CLIENT knows them (the study's signer
    registry, not the server's word), and the least cohort the study declared.

    Why a client needs it: a server that relays only {client-0, client-1} to client 0 makes
    client 0's whole mask PRG(s_01), which client 1 knows; if client 1 also holds the shared
    CKKS key it reads client 0's values. A mask over exactly the declared cohort (at least
    `min_clients` of it) leaves every honest peer's seed in it."""

    members: frozenset[str]
    min_clients: int

    def __post_init__(self) -> None:
        if not (isinstance(self.min_clients, int) and self.min_clients >= 2):
            raise CryptoError(f"a masking cohort's declared minimum is at least 2, got {self.min_clients!r}")
        if not all(isinstance(m, str) and m for m in self.members):
            raise CryptoError("a masking cohort's members are non-empty client ids")
        if len(self.members) < self.min_clients:
            raise CryptoError(
                f"the expected cohort has {len(self.members)} members, below the declared minimum "
                f"{self.min_clients}: masks over fewer would expose a client to fewer colluders"
            )

    @classmethod
    def of(cls, members: Iterable[str], min_clients: int) -> ExpectedCohort:
        """From any list of ids (e.g. a SignerRegistry, which iterates over its client ids)."""
        return cls(frozenset(members), min_clients)


def _info(context: MaskContext, low: str, high: str, roster: str) -> bytes:
    """HKDF's info: canonical JSON, so no two (run, pair, round, stage, roster) give the same
    string. The roster digest (`MaskRegistry.digest`) makes clients that were shown different
    registries derive unrelated seeds, so the sum refuses instead of unmasking a split view."""
    content = {
        "domain": MASK_DOMAIN,
        "run": context.run_id,
        "pair": [low, high],
        "round": context.round,
        "stage": context.stage,
        "roster": roster,
    }
    return json.dumps(content, sort_keys=True, separators=(",", ":")).encode()


def prg_words(seed: bytes, length: int, word_bits: int) -> np.ndarray:
    """`length` words uniform modulo 2^word_bits: ChaCha20's keystream under `seed`, as uint64."""
    if len(seed) != _KEY_BYTES:
        raise CryptoError("a mask seed is 32 bytes")
    if not 1 <= word_bits <= 64:
        raise CryptoError(f"word_bits must be in [1, 64], got {word_bits}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    words = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    return words & _low_bits(word_bits)


def _low_bits(word_bits: int) -> np.uint64:
    return np.uint64((1 << word_bits) - 1)


class MaskingKey:
    """One client's X25519 key for one run. The private key never leaves this object: its repr
    shows the public half only, and nothing here serialises the private half."""

    def __init__(self, client_id: str, run_id: str, private: X25519PrivateKey) -> None:
        if not (isinstance(client_id, str) and client_id):
            raise CryptoError("a masking key belongs to a named client")
        self.client_id = client_id
        self.run_id = run_id
        self._private = private
        self.public_bytes = private.public_key().public_bytes_raw()
        self._used: set[MaskContext] = set()

    @classmethod
    def generate(cls, client_id: str, run_id: str) -> MaskingKey:
        return cls(client_id, run_id, X25519PrivateKey.generate())

    def __repr__(self) -> str:
        return f"MaskingKey(client={self.client_id!r}, public={self.public_bytes.hex()[:12]}...)"

    def announce(self, signing: SigningKey) -> MaskAnnouncement:
        """This key's public half for the run, signed with the client's registered Ed25519 key:
        what the key-agreement stage carries, so that a server relaying the keys cannot
        substitute its own (it would then share, and know, every seed of the client's masks)."""
        if signing.client_id != self.client_id:
            raise CryptoError(f"{self.client_id}'s masking key is announced with its own signing key only")
        body = announcement_statement(self.run_id, self.client_id, self.public_bytes)
        return MaskAnnouncement(self.client_id, self.run_id, self.public_bytes, signing.sign(body))

    def seed(self, peer_id: str, peer_public: bytes, context: MaskContext, roster: str) -> bytes:
        """The seed this client shares with `peer_id` for `context` under the registry whose
        digest is `roster` (both ends derive the same when they saw the same registry)."""
        if context.run_id != self.run_id:
            raise CryptoError(
                f"{self.client_id}'s masking key is for run {self.run_id[:12]!r}, not "
                f"{context.run_id[:12]!r}: masking keys are fresh per run"
            )
        if peer_id == self.client_id:
            raise CryptoError("a client shares no mask with itself")
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # a malformed or low-order public key (all-zero secret)
            raise CryptoError(f"{peer_id}'s masking public key is unusable: {exc}") from None
        low, high = sorted((self.client_id, peer_id))
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=_info(context, low, high, roster)
        )
        return hkdf.derive(shared)

    def mask(
        self,
        registry: MaskRegistry,
        context: MaskContext,
        length: int,
        word_bits: int,
        cohort: ExpectedCohort,
    ) -> np.ndarray:
        """This client's mask for `length` words: the pairwise PRG words, added for peers after
        it in sorted order and subtracted for peers before it, modulo 2^word_bits.

        The registry must hold exactly the `cohort` the client expects: a server-chosen subset
        would leave the client's mask to the few peers in it (`ExpectedCohort`).

        A mask is used once: two uploads under one mask differ by the difference of their
        values, in the clear to whoever decrypts both (a two-time pad), so a second mask for the
        same context (a retry, a second field of the stage) is refused. A stage masks its whole
        payload as one vector."""
        if self.client_id not in registry or registry[self.client_id] != self.public_bytes:
            raise CryptoError(f"{self.client_id}'s masking key is not the one the registry holds")
        _check_cohort(registry, cohort)
        if context in self._used:
            raise CryptoError(
                f"{self.client_id} already masked an upload for round {context.round}, stage "
                f"{context.stage!r}: a mask is used once (a second upload under it would reveal the "
                "difference of the two); mask the stage's whole payload as one vector"
            )
        self._used.add(context)
        total = np.zeros(length, dtype=np.uint64)
        roster = registry.digest()
        for peer in registry:
            if peer == self.client_id:
                continue
            words = prg_words(self.seed(peer, registry[peer], context, roster), length, word_bits)
            # uint64 arithmetic wraps modulo 2^64, and 2^word_bits divides 2^64.
            total = total + words if self.client_id < peer else total - words
        return total & _low_bits(word_bits)


def _check_cohort(registry: MaskRegistry, cohort: ExpectedCohort) -> None:
    present = frozenset(registry)
    if present != cohort.members:
        missing = sorted(cohort.members - present)
        extra = sorted(present - cohort.members)
        raise CryptoError(
            f"the masking registry is not the expected cohort (missing {missing}, unexpected {extra}): "
            "a mask over a subset would leave this client's values to the few peers in it; refusing "
            "to mask. Take the cohort from the study's signer registry, not from the server"
        )


def announcement_statement(run_id: str, client_id: str, public: bytes) -> bytes:
    """What a masking key's announcement signs: the run, the client and the public key."""
    return statement(ANNOUNCEMENT_DOMAIN, {"run": run_id, "client": client_id, "public": public.hex()})


@dataclass(frozen=True)
class MaskAnnouncement:
    """One client's masking public key for one run, and its Ed25519 signature (hex)."""

    client_id: str
    run_id: str
    public_bytes: bytes
    signature: str


class MaskRegistry:
    """The cohort's masking public keys by client id: what the server holds and relays (public
    bytes only). The mask graph is the whole registry: a sum unmasks only over all of it."""

    def __init__(self, run_id: str, keys: Mapping[str, bytes]) -> None:
        if len(keys) < 2:
            raise CryptoError("pairwise masks need at least two clients")
        for client, key in keys.items():
            if not (isinstance(client, str) and client and isinstance(key, bytes) and len(key) == _KEY_BYTES):
                raise CryptoError(f"client {client!r}: an X25519 public key is 32 bytes")
        self.run_id = run_id
        self._keys = MappingProxyType(dict(sorted(keys.items())))

    @classmethod
    def of(cls, keys: Sequence[MaskingKey]) -> MaskRegistry:
        runs = {k.run_id for k in keys}
        if len(runs) != 1:
            raise CryptoError("a registry's masking keys all belong to one run")
        return cls(runs.pop(), {k.client_id: k.public_bytes for k in keys})

    @classmethod
    def verified(
        cls, run_id: str, announcements: Sequence[MaskAnnouncement], signers: SignerRegistry
    ) -> MaskRegistry:
        """The registry of announcements for `run_id` whose signatures verify against the study's
        registered signing keys; `CryptoError` (naming the client) for any other: a key
        substituted on the way, an announcement replayed from another run, or a client twice."""
        keys: dict[str, bytes] = {}
        for a in announcements:
            if a.run_id != run_id:
                raise CryptoError(f"{a.client_id}'s masking key was announced for another run")
            if a.client_id in keys:
                raise CryptoError(f"{a.client_id} announced two masking keys")
            body = announcement_statement(run_id, a.client_id, a.public_bytes)
            try:
                signers.verify(a.client_id, body, a.signature)
            except CryptoError as exc:
                raise CryptoError(f"{a.client_id}'s masking key is refused: {exc}") from None
            keys[a.client_id] = a.public_bytes
        return cls(run_id, keys)

    def __getitem__(self, client: str) -> bytes:
        return self._keys[client]

    def __contains__(self, client: object) -> bool:
        return client in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"MaskRegistry(run={self.run_id[:12]!r}, {len(self)} clients)"

    def digest(self) -> str:
        """SHA-256 (hex) of the sorted (client id, public key) list: what every seed binds, so
        that two clients shown different registries share no seed."""
        roster = [[c, k.hex()] for c, k in self._keys.items()]  # sorted at construction
        body = json.dumps(roster, separators=(",", ":")).encode()  # the run is in the info already
        return hashlib.sha256(body).hexdigest()

    def to_json(self) -> dict[str, object]:
        return {
            "run": self.run_id,
            "algorithm": "x25519",
            "keys": {c: k.hex() for c, k in self._keys.items()},
        }


@dataclass(frozen=True)
class MaskingParameters:
    """A CKKS parameter set and a word size b under which CKKS carries masked words exactly.

    Two checks, both worst case over the values (masked words are uniform, so anything within
    the range occurs):
    - headroom: the sum of `max_clients` centred words, |.| <= max_clients 2^(b-1) per real or
      imaginary part, so |slot| <= sqrt(2) max_clients 2^(b-1), and every plaintext coefficient
      is bounded by the largest slot (the inverse canonical embedding averages the slots over
      unit roots); times the scale, plus the noise, it must stay below q/2 for the real data
      modulus q (SEAL's primes, not their bit counts);
    - error: the decrypted sum must be within `ERROR_LIMIT` of the integer (`error_bound`).
    """

    ckks: CkksParameters
    word_bits: int

    def __post_init__(self) -> None:
        if not 8 <= self.word_bits <= 52:
            # A word must be exact in a double (CKKS encodes float64s): at most 52 bits.
            raise CryptoError(f"word_bits must be in [8, 52], got {self.word_bits}")
        if self.ckks.value_bound < 2.0 ** (self.word_bits - 1):
            raise CryptoError(
                f"the CKKS parameters' value bound {self.ckks.value_bound:g} is below the centred "
                f"word's 2^{self.word_bits - 1}: encryption would refuse masked words"
            )
        if self.coefficient_bound() >= self.data_modulus() / 2:
            raise CryptoError(
                f"no headroom: a sum of {self.ckks.max_clients} masked {self.word_bits}-bit words at "
                f"scale 2^{self.ckks.scale_bits} needs coefficients up to "
                f"2^{math.log2(self.coefficient_bound()):.2f}, the data modulus holds "
                f"2^{math.log2(self.data_modulus() / 2):.2f}; use fewer word bits, a lower scale or a "
                "larger modulus"
            )
        if self.error_bound() > ERROR_LIMIT:
            raise CryptoError(
                f"the decrypted sum of {self.ckks.max_clients} uploads may be off by "
                f"{self.error_bound():.3g}, above {ERROR_LIMIT}: it could round to the wrong integer. "
                "Raise the scale or lower the word bits"
            )

    def data_modulus(self) -> int:
        primes = sealapi.CoeffModulus.Create(
            self.ckks.poly_modulus_degree, list(self.ckks.coeff_mod_bit_sizes)
        )
        return math.prod(int(p.value()) for p in primes[:-1])

    def coefficient_bound(self) -> float:
        """Largest |coefficient| of the decrypted sum's plaintext (scaled units)."""
        n = self.ckks.max_clients
        slot = math.sqrt(VALUES_PER_SLOT) * n * 2.0 ** (self.word_bits - 1)
        return slot * self.ckks.scale + n * (SEAL_NOISE_MAX + 0.5)

    def error_bound(self) -> float:
        """Worst-case |decrypted - exact| of any value of a sum of `max_clients` fresh uploads.

        - Noise: symmetric encryption decrypts to plaintext + e with |e_i| <= 21 per coefficient,
          and encoding rounds each coefficient by <= 1/2 (SEAL_NOISE_MAX); a sum of n uploads has
          |e_i| <= 21.5 n; a slot is a sum of N coefficients times unit roots: <= 21.5 n N, over
          the scale.
        - Floating point: encoding (per client) and decoding (of the sum) run an FFT of log2(N)
          stages in float64. We bound each by (log2 N + 2) ulps of the largest slot per
          coefficient, summed over the N coefficients of a slot: loose (typical errors grow with
          sqrt, not N), and what makes word_bits the binding constraint.
        """
        n, big_n = self.ckks.max_clients, self.ckks.poly_modulus_degree
        noise = big_n * n * (SEAL_NOISE_MAX + 0.5) / self.ckks.scale
        word = math.sqrt(VALUES_PER_SLOT) * 2.0 ** (self.word_bits - 1)
        ulps = (math.log2(big_n) + 2) * _DOUBLE_EPSILON * big_n
        floating = ulps * word * n * 2  # n encodings of one word each, one decoding of n words
        return noise + floating

    @classmethod
    def for_cohort(
        cls,
        max_clients: int,
        poly_modulus_degree: int = 4096,
        coeff_mod_bit_sizes: tuple[int, ...] = (60, 49),
    ) -> MaskingParameters:
        """The largest word size any scale allows for `max_clients` under these CKKS primes."""
        best: MaskingParameters | None = None
        for scale_bits in range(20, coeff_mod_bit_sizes[-1] + 1):
            for word_bits in range(52, 7, -1):
                try:
                    ckks = CkksParameters(
                        poly_modulus_degree=poly_modulus_degree,
                        coeff_mod_bit_sizes=coeff_mod_bit_sizes,
                        scale_bits=scale_bits,
                        value_bound=2.0 ** (word_bits - 1),
                        max_clients=max_clients,
                    )
                    candidate = cls(ckks, word_bits)
                except CryptoError:
                    continue
                if best is None or (candidate.word_bits, -candidate.error_bound()) > (
                    best.word_bits,
                    -best.error_bound(),
                ):
                    best = candidate
                break
        if best is None:
            raise CryptoError(
                f"no scale lets N={poly_modulus_degree} with primes {coeff_mod_bit_sizes} carry a sum of "
                f"{max_clients} masked words exactly; use a larger modulus"
            )
        return best


@dataclass(frozen=True)
class FixedPoint:
    """Real vectors as integers modulo 2^word_bits: round(x 2^frac_bits), two's complement.

    `value_bound` bounds |x| of each client's value; `headroom` the magnitude the cohort's
    summed integer noise may reach (privacy.discrete_noise gives it with its tail probability).
    The sum of `max_clients` values and the noise must stay within the centred range
    [-2^(b-1), 2^(b-1)), or it wraps and decodes to the wrong sign (DP is unaffected: wrapping
    is post-processing; accuracy is not).
    """

    word_bits: int
    frac_bits: int
    value_bound: float
    max_clients: int
    headroom: int = 0

    def __post_init__(self) -> None:
        if not (8 <= self.word_bits <= 52 and 0 <= self.frac_bits < self.word_bits):
            raise CryptoError("word_bits must be in [8, 52] and frac_bits in [0, word_bits)")
        if not (self.value_bound > 0 and math.isfinite(self.value_bound) and self.max_clients >= 1):
            raise CryptoError("value_bound must be positive and finite, max_clients at least 1")
        if self.headroom < 0:
            raise CryptoError("headroom must be non-negative")
        reach = self.max_clients * self.max_integer + self.headroom
        if reach >= 2 ** (self.word_bits - 1):
            raise CryptoError(
                f"a sum of {self.max_clients} values of magnitude {self.value_bound:g} at step "
                f"2^-{self.frac_bits} "
                f"plus {self.headroom} of noise reaches {reach}, beyond a {self.word_bits}-bit word's "
                f"2^{self.word_bits - 1}: lower frac_bits or the bound, or use more word bits"
            )

    @cached_property
    def max_integer(self) -> int:
        return math.ceil(self.value_bound * 2.0**self.frac_bits)

    def quantise(self, values: np.ndarray) -> np.ndarray:
        """round(x 2^f) as int64 (deterministic rounding: privacy.discrete_noise counts its
        sqrt(d) in the sensitivity). Refuses non-finite values and values beyond the bound."""
        flat = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(flat)):
            raise CryptoError("refusing to encode NaN or infinity")
        if flat.size and np.max(np.abs(flat)) > self.value_bound:
            raise CryptoError(
                f"a value of magnitude {np.max(np.abs(flat)):.3g} exceeds the declared bound "
                f"{self.value_bound:g}: clip before encoding"
            )
        integers: np.ndarray = np.rint(flat * 2.0**self.frac_bits).astype(np.int64)
        return integers

    def words(self, integers: np.ndarray) -> np.ndarray:
        """Signed integers as words modulo 2^b (two's complement)."""
        return np.asarray(integers, dtype=np.int64).astype(np.uint64) & _low_bits(self.word_bits)

    def encode(self, values: np.ndarray) -> np.ndarray:
        return self.words(self.quantise(values))

    def signed(self, words: np.ndarray) -> np.ndarray:
        """Words modulo 2^b as signed integers in [-2^(b-1), 2^(b-1))."""
        return centred(words, self.word_bits)

    def decode(self, words: np.ndarray) -> np.ndarray:
        decoded: np.ndarray = self.signed(words).astype(np.float64) / 2.0**self.frac_bits
        return decoded


def centred(words: np.ndarray, word_bits: int) -> np.ndarray:
    w = np.asarray(words, dtype=np.uint64) & _low_bits(word_bits)
    signed = w.astype(np.int64)
    signed[w >= np.uint64(1 << (word_bits - 1))] -= np.int64(1) << np.int64(word_bits)
    return signed


def masked_upload(words: np.ndarray, mask: np.ndarray, word_bits: int) -> np.ndarray:
    """What a client encrypts: its words, then `CHECK_WORDS` ones, plus its mask (length of
    words + CHECK_WORDS), modulo 2^b, centred, as float64 (exact: b <= 52)."""
    payload = np.concatenate([np.asarray(words, dtype=np.uint64), np.ones(CHECK_WORDS, dtype=np.uint64)])
    if mask.shape != payload.shape:
        raise CryptoError(f"a mask of {mask.size} words for {payload.size} payload words")
    masked = (payload + np.asarray(mask, dtype=np.uint64)) & _low_bits(word_bits)
    upload: np.ndarray = centred(masked, word_bits).astype(np.float64)
    return upload


def unmask_sum(
    decrypted: np.ndarray, params: MaskingParameters, cohort: ExpectedCohort | MaskRegistry
) -> np.ndarray:
    """The summed words modulo 2^b from a decrypted sum of masked uploads, or `CryptoError` when
    the sum is not the full cohort's: a missing (or extra, or repeated) upload leaves masks that
    did not cancel, and the check words then do not read the cohort's size.

    The count is the cohort's size, never a number the server supplies: a sum of every upload
    twice cancels every mask too, and its check words read twice the cohort; only a count
    taken from the cohort refuses it."""
    contributors = len(cohort.members) if isinstance(cohort, ExpectedCohort) else len(cohort)
    if contributors > params.ckks.max_clients:
        raise CryptoError(
            f"a cohort of {contributors} is beyond the {params.ckks.max_clients} clients these "
            "parameters were admitted for: its sum may not round to its integer"
        )
    values = np.asarray(decrypted, dtype=np.float64)
    if values.size <= CHECK_WORDS or not np.all(np.isfinite(values)):
        raise CryptoError("a masked sum holds finite values and its check words")
    integers = np.rint(values)
    off = float(np.max(np.abs(values - integers)))
    if off > ERROR_LIMIT:
        raise CryptoError(
            f"a decrypted masked sum is {off:.3g} from an integer, beyond the parameters' bound "
            f"{ERROR_LIMIT}: these are not the parameters it was encrypted under"
        )
    low = _low_bits(params.word_bits)
    words = integers.astype(np.int64).astype(np.uint64) & low
    check = centred(words[-CHECK_WORDS:], params.word_bits)
    if not np.all(check == contributors):
        raise CryptoError(
            f"the masked sum does not unmask: its check words read {check.tolist()}, not {contributors} "
            "each. Some client's upload is missing (or counted twice), so its masks did not cancel; "
            "the sum is refused, not decoded"
        )
    return words[:-CHECK_WORDS]
