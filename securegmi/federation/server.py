"""The server and the round it plays: broadcast, collect, add (docs/design.md §1).

One `Server` serves every protocol: the declaration says which server stage returns the sums
of which client fields, and its summation (`codec`) adds them in the clear or under CKKS. It
never divides and never reads a client's values beyond adding them; clients divide.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from securegmi.crypto.keys import PublicContext
from securegmi.crypto.signing import SignerRegistry
from securegmi.errors import (
    ConfigError,
    CryptoError,
    ProtocolViolation,
    RefusalError,
    RunAbortedError,
    RunDirectoryError,
)
from securegmi.federation.codec import Admitted, CkksSum, ClearSum, Summation
from securegmi.federation.transport import ServerEndpoint, Transport
from securegmi.files import write_atomic
from securegmi.protocol import SERVER, FieldKind, Message, ProtocolSpec, TranscriptWriter
from securegmi.protocol.fields import field_array
from securegmi.protocol.payload import build_payload
from securegmi.vocabulary import EventId, EventName, FieldName, Stage


class Server:
    """Keeps the sums of the last round's replies; holds no secret.

    `public` is the ceremony's public CKKS context, which a `ckks` protocol needs (the server
    can check and add ciphertexts with it, never read or make them). `endpoint` validates and
    records (with `transcript_path`) every message it sends and receives: a transport, or your
    own code carrying bytes, goes through it. `signers`, the study's registry of the clients'
    Ed25519 public keys: every reply must be signed by its client's key (`SignatureError`,
    recorded as rejected, otherwise); None accepts unsigned replies, as before signatures.
    """

    def __init__(
        self,
        spec: ProtocolSpec,
        public: PublicContext | None = None,
        *,
        cohort_minimum: Mapping[str, int] | None = None,
        transcript_path: Path | None = None,
        run_id: str | None = None,
        signers: SignerRegistry | None = None,
    ) -> None:
        if spec.codec == "ckks" and public is None:
            raise CryptoError(f"protocol {spec.name!r} sends ciphertexts: pass the ceremony's public context")
        if spec.codec == "clear" and public is not None:
            raise ConfigError(f"protocol {spec.name!r} sends nothing encrypted: drop the public context")
        self.spec = spec
        self.public = public  # the ceremony's public context (None in the clear)
        self.summation: Summation = CkksSum(public, spec) if public is not None else ClearSum(spec)
        transcript = TranscriptWriter(Path(transcript_path)) if transcript_path is not None else None
        self.endpoint = ServerEndpoint(spec, transcript, signers)
        # Per uplink stage: the fewest replies whose sum may be released. The protocol declares
        # it where the noise is split (shares of sigma / sqrt(N - 1): privacy.calibration.
        # StatisticsPlan), and no server is built below that (docs/design.md §2, law 3); a caller may
        # only ask for more.
        self.cohort_minimum = {
            s.name: spec.min_shares(spec.downlink_after(s.name).name)
            for s in spec.stages
            if s.sender == "client"
        }
        for stage, minimum in (cohort_minimum or {}).items():
            declared = self.cohort_minimum.get(stage)
            if declared is None:
                raise ConfigError(f"protocol {spec.name!r} has no client stage {stage!r} to set a cohort for")
            if minimum < declared:
                raise ConfigError(
                    f"a minimum cohort of {minimum} for {stage!r} is below the {declared} releases protocol "
                    f"{spec.name!r} declares: each client adds a sigma / sqrt({max(declared - 1, 1)}) share "
                    "of the noise, so a smaller sum would carry less than the planned noise"
                )
            self.cohort_minimum[stage] = minimum
        self.contributions = 0  # how many replies the last sums add
        self.totals: dict[str, np.ndarray | bytes] = {}
        self.after: str | None = None  # the uplink stage the totals sum; None before round 0
        self.round: int | None = None  # the round of the last broadcast: replies must answer it
        self.aggregated: int | None = None  # the last round whose replies were added
        # Fresh per run unless given (a resumed run keeps its id): replies must carry it.
        self.run_id = run_id or secrets.token_hex(16)

    def release_grid(self) -> float | None:
        """Under CKKS, the grid every decrypted aggregate is rounded to on release (so is what a
        run exports from them); None in the clear."""
        return self.public.params.release_grid() if self.public is not None else None

    def send(self, client_id: str, message: Message) -> bytes:
        """`message` as the bytes to carry to `client_id`: checked against the protocol, and on
        the transcript, before it leaves."""
        return self.endpoint.send(client_id, message)

    def accept(self, client_id: str, wire: bytes) -> Message:
        """`client_id`'s reply bytes as a message, checked against the protocol and recorded:
        `ProtocolViolation` (recorded as rejected) for one the protocol does not declare."""
        return self.endpoint.accept(client_id, wire)

    def broadcast(self, round_index: int, temperature: float) -> Message:
        """`start` in round 0; then the sums of the previous round's replies."""
        stage = self.spec.stage(Stage.START) if self.after is None else self.spec.downlink_after(self.after)
        values: dict[str, np.ndarray | bytes] = {}
        events: dict[str, str] = {}
        for f in stage.fields:
            if f.sum_of is not None:
                values[f.name] = self.totals[f.name]
                # Under a DP protocol the sums are post-processing of the clients' releases.
                # Its provenance reads like a ledger id (aggregate@round<t>), for the transcript.
                events[f.name] = str(EventId(EventName.AGGREGATE, round_index - 1))
            elif f.kind is FieldKind.PUBLIC and f.name == FieldName.TEMPERATURE:
                values[f.name] = np.asarray(temperature, dtype=np.float64)
            elif f.kind is FieldKind.PUBLIC and f.name == FieldName.CONTRIBUTIONS:
                values[f.name] = np.asarray(self.contributions, dtype=np.int64)
        payload = build_payload(stage, values, events, self.summation.key_id)
        self.round = round_index
        return Message(stage=stage.name, round=round_index, sender=SERVER, payload=payload, run=self.run_id)

    def aggregate(self, replies: Mapping[str, Message]) -> dict[str, str]:
        """Add every reply that passes the summation's checks; return why the others were
        rejected. Nothing is released from fewer replies than the stage's minimum cohort."""
        if not replies:
            raise RunAbortedError("no replies to aggregate")
        if self.aggregated is not None and self.aggregated == self.round:
            # One sum per round: a second batch would be a second message from each client.
            raise ProtocolViolation(f"round {self.round} was already aggregated")
        first = next(iter(replies.values()))
        admitted: list[Admitted] = []
        rejected: dict[str, str] = {}
        for sender, message in replies.items():
            try:
                if message.sender != sender:
                    raise ProtocolViolation(f"a reply signed by {message.sender!r} on {sender!r}'s link")
                if message.run != self.run_id:
                    raise ProtocolViolation(f"a reply from another run ({message.run[:12]!r})")
                if message.round != self.round:
                    # A reply to another round (a replay, or a straggler) is never added.
                    raise ProtocolViolation(f"a reply to round {message.round} in round {self.round}")
                if message.stage != first.stage:
                    raise ProtocolViolation(f"stage {message.stage!r} in a round of {first.stage!r}")
                admitted.append(self.summation.admit(message))
            except RefusalError as exc:
                rejected[sender] = str(exc)
                self.endpoint.refuse(sender, message, f"not added: {exc}")  # on the transcript
        minimum = self.cohort_minimum.get(first.stage, 1)
        if len(admitted) < minimum:
            raise RunAbortedError(
                f"round {self.round}: {len(admitted)} {first.stage} replies were accepted, the minimum "
                f"cohort is {minimum}; with fewer the sum would carry less than the planned noise, so "
                "the round is abandoned and nothing is released"
            )
        up, down = self.spec.stage(first.stage), self.spec.downlink_after(first.stage)
        self.totals = {
            f.name: self.summation.add(admitted, f, up.require(f.sum_of))
            for f in down.fields
            if f.sum_of is not None
        }
        self.after = first.stage
        self.aggregated = self.round
        self.contributions = len(admitted)
        return rejected

    def save_state(self, path: Path, extra: Mapping[str, str] | None = None) -> None:
        """Write what the server carries between rounds (the last sums, under CKKS ciphertexts
        it cannot read, and the run id) atomically as safetensors; `extra` is kept beside it."""
        arrays = {
            f"total.{name}": np.frombuffer(v, dtype=np.uint8) if isinstance(v, bytes) else np.asarray(v)
            for name, v in self.totals.items()
        }
        metadata = {
            "run": self.run_id,
            "after": json.dumps(self.after),
            "round": json.dumps(self.round),
            "aggregated": json.dumps(self.aggregated),
            "contributions": json.dumps(self.contributions),
            "ciphertexts": json.dumps(sorted(n for n, v in self.totals.items() if isinstance(v, bytes))),
            **(extra or {}),
        }
        data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)
        write_atomic(path, data, mode=0o600)  # a fresh temporary file, then rename: never via a link

    def load_state(self, path: Path) -> dict[str, str]:
        """Take up the state `save_state` wrote; returns its metadata (with `extra`)."""
        try:
            arrays = load_file(str(path))
            with safe_open(str(path), framework="numpy") as fh:
                metadata = dict(fh.metadata() or {})
            encrypted = set(json.loads(metadata["ciphertexts"]))
            totals: dict[str, np.ndarray | bytes] = {
                k.removeprefix("total."): v.tobytes() if k.removeprefix("total.") in encrypted else v
                for k, v in arrays.items()
            }
            after, round_index, aggregated, contributions = (
                json.loads(metadata[k]) for k in ("after", "round", "aggregated", "contributions")
            )
            run_id = metadata["run"]
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            raise RunDirectoryError(f"cannot read the server's state {path}: {exc}") from exc
        self.totals, self.after, self.round, self.aggregated, self.run_id = (
            totals,
            after,
            round_index,
            aggregated,
            run_id,
        )
        self.contributions = int(contributions)
        return metadata

    def close(self) -> None:
        """Close the transcript (everything in it is already on disk, line by line)."""
        if self.endpoint.transcript is not None:
            self.endpoint.transcript.close()


@dataclass(frozen=True)
class RoundOutcome:
    replies: dict[str, Message]
    refused: dict[str, str]  # by the client's own checks or ledger, or on receipt
    rejected: dict[str, str]  # by the server's summation checks
    uplink_bytes: int


def play_round(
    server: Server, transport: Transport, client_ids: list[str], round_index: int, temperature: float
) -> RoundOutcome:
    """One round: broadcast, collect the validated replies, add them. Whatever the transport."""
    broadcast = server.broadcast(round_index, temperature)
    exchange = transport.exchange({cid: broadcast for cid in client_ids})
    if not exchange.replies:
        reason = next(iter(exchange.refused.values()), "no client was addressed")
        raise RunAbortedError(f"round {round_index}: every client refused ({reason})")
    rejected = server.aggregate(exchange.replies)
    uplink = sum(field_array(f).nbytes for m in exchange.replies.values() for f in m.payload.values())
    return RoundOutcome(exchange.replies, exchange.refused, rejected, uplink)
