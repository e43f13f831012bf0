"""`Client`: the one FedGMI client class, which your own code drives with your own components and data.

You build it from a mixture of VAE components (the built-in MLP, or your encoder and decoder
through `MixtureOfVAEs.from_factory`), your records (an array, a tensor, a `Dataset` or a
`DataLoader`), the protocol the federation runs, and, as that protocol requires, a privacy plan
and the clients' CKKS key. Then hand it each message the server sends (`receive` for wire
bytes, `handle` for decoded messages) and send back what it returns. Every message is checked
against the protocol in both directions, so an undeclared value never leaves the client.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save
from torch.utils.data import DataLoader, Dataset

from securegmi.core.em import fixed_point_pi
from securegmi.core.fine_clusters import FineClusterModel
from securegmi.core.mixture import SCORE_SAMPLES, MixtureOfVAEs, score_in_blocks
from securegmi.crypto.keys import SecretContext
from securegmi.crypto.signing import SigningKey
from securegmi.errors import (
    ConfigError,
    CryptoError,
    DataError,
    PrivacyError,
    ProtocolViolation,
    RunDirectoryError,
    SecureGMIError,
)
from securegmi.federation.codec import CkksCodec, ClearCodec, ClientCodec
from securegmi.federation.local import DP_LEARNING_RATE, ClientSettings, LocalLearner
from securegmi.federation.release import (
    ClientPrivacy,
    CountsRelease,
    PlainRelease,
    ReleasePolicy,
    StatisticsRelease,
)
from securegmi.federation.statistics import UPLINK
from securegmi.federation.transport import ClientEndpoint
from securegmi.files import STATE_FILE, read_bytes, safetensors_arrays, write_atomic
from securegmi.privacy.calibration import DpPlan, PrivateMixturePlan, check_delta
from securegmi.privacy.ledger import PrivacyLedger
from securegmi.protocol import Message, ProtocolSpec, TranscriptWriter, decode, encode
from securegmi.protocol.payload import build_payload
from securegmi.protocol.signed import sign_message
from securegmi.vocabulary import FieldName, Placement, Stage

# The public context of the ELBO draws a client scores its own records with (core.latent).
_OWN_PI_SEED = 4_099

Records = np.ndarray | torch.Tensor | Dataset[Any] | DataLoader[Any] | Iterable[Any]


def as_records(data: Records) -> np.ndarray:
    """Your records as one (n, D) float32 array; a record with more than one axis (an image)
    is flattened, and a (record, label) pair keeps its record.

    The whole client's data is held in memory: every round's E-step scores every record.
    """
    if isinstance(data, np.ndarray | torch.Tensor):
        if data.ndim < 2:
            raise DataError(
                f"records come as (n, ...) with one row per record, got shape {tuple(data.shape)}"
            )
        rows = [data]
    elif isinstance(data, DataLoader):
        rows = [_first(batch) for batch in data]
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        rows = [_first(data[i])[None] for i in range(len(data))]
    elif isinstance(data, Iterable):
        rows = [_first(item)[None] for item in data]
    else:
        raise DataError(
            f"cannot read records from a {type(data).__name__}: pass an array, Dataset or DataLoader"
        )
    arrays = [
        np.asarray(r.detach().cpu() if isinstance(r, torch.Tensor) else r, dtype=np.float32) for r in rows
    ]
    if not arrays or sum(len(a) for a in arrays) == 0:
        raise DataError("the client has no records")
    x = np.concatenate([a.reshape(len(a), -1) for a in arrays])
    if not np.isfinite(x).all():
        raise DataError("records contain NaN or infinite values")
    return np.ascontiguousarray(x)


def _first(item: Any) -> Any:
    """A (record, label, ...) item gives its record; labels never enter a client."""
    return item[0] if isinstance(item, tuple | list) else item


class Client:
    """One site of a federation. It holds its records, its model copy, its mixture estimate pi,
    and the protocol's release policy (with its privacy ledger under DP) and codec (with the
    clients' CKKS key under `secure`); ground truth never enters it."""

    def __init__(
        self,
        client_id: str,
        components: MixtureOfVAEs,
        data: Records,
        protocol: ProtocolSpec,
        *,
        settings: ClientSettings | None = None,
        privacy: ClientPrivacy | None = None,
        keys: SecretContext | None = None,
        seed: int = 0,  # the federation's public seed: ELBO draws and minibatch order
        state_path: Path | None = None,
        transcript_path: Path | None = None,
        signing_key: SigningKey | None = None,
    ) -> None:
        x = as_records(data)
        components.check(x.shape[1])
        components.check_records(x)
        if privacy is not None:  # the rule simulate's plan checks, here for a plan of your own
            check_delta(privacy.plan.delta, len(x))
        _check_protocol(protocol, components, privacy, keys)
        if signing_key is not None and signing_key.client_id != client_id:
            raise ConfigError(
                f"{client_id} was given {signing_key.client_id}'s signing key: each client signs with its own"
            )
        self.client_id = client_id
        # This client's Ed25519 key (its secret: never in a message, the state or the ledger).
        # With it, every reply and every ledger entry is signed.
        self.signing_key = signing_key
        self.spec = protocol
        self.state_path = Path(state_path) if state_path is not None else None
        self.run_id: str | None = None  # the run this client joined (its first message's)
        # Write-ahead outbox: (run, round, inbound stage, reply bytes) of the last reply, saved
        # with the state before the reply leaves. A server that resends that message after a
        # crash gets the identical bytes: the same release is never drawn twice with fresh noise.
        self.outbox: tuple[str, int, str, bytes] | None = None
        # A copy: two clients built from one object must not train the same weights.
        own = copy.deepcopy(components)
        if settings is None:
            private = privacy is not None
            settings = ClientSettings(learning_rate=DP_LEARNING_RATE) if private else ClientSettings()
        self.learner = LocalLearner(client_id, x, own, settings, seed)
        self.privacy = privacy  # the federation's DP plan and this client's part in it
        self.policy: ReleasePolicy = _policy(self.learner, privacy, signing_key)
        self.codec: ClientCodec = CkksCodec(keys) if keys is not None else ClearCodec()
        if self.state_path is not None and os.path.lexists(self.state_path):
            self._restore(self.state_path)
        transcript = TranscriptWriter(Path(transcript_path)) if transcript_path is not None else None
        self.endpoint = ClientEndpoint(client_id, self._handle, protocol, transcript)

    @property
    def pi(self) -> np.ndarray:
        """This client's current mixture estimate."""
        return self.learner.pi.copy()

    def own_pi(self) -> np.ndarray:
        """This client's own mixture proportions: the EM fixed point of pi on its own records
        under the model it holds now (the identifier's scores where it has one, otherwise the
        VAEs' ELBOs), started from its released `pi`. Call it once the run is over
        (`conclude`), so the model is the federation's final one.

        It is this client's own output, never a release: nothing sends it, saves it or lets it
        weight a record's loss (a private pi in the loss would let one record move every other
        record's, docs/design.md §1), and it leaves this client exactly as it was. Under DP,
        what the others learn is the released model, and a site's own use of that model on its
        own records costs nothing more (the billboard lemma, Hsu et al., STOC 2014): the run's
        model keeps the released `pi`; this one is the site's, to keep where it keeps its records.
        """
        x, model = self.learner.x, self.learner.model
        if self.identifier is not None:
            scores = torch.as_tensor(self.identifier.log_likelihood(x))
        else:
            training = model.training
            model.eval()
            try:
                scores = torch.as_tensor(
                    score_in_blocks(lambda b: model.elbo_matrix(b, SCORE_SAMPLES), x, _OWN_PI_SEED)
                )
            finally:
                model.train(training)
        return fixed_point_pi(scores, self.learner.pi, self.learner.settings.pi_floor)

    @property
    def plan(self) -> DpPlan | PrivateMixturePlan | None:
        """The federation's DP plan this client follows, or None under a protocol without DP."""
        return self.privacy.plan if self.privacy is not None else None

    @property
    def identifier(self) -> FineClusterModel | None:
        """The source identifier built from the released statistics (private runs of the
        statistics design, once the phase is over): `log_likelihood(x)` gives (n, K)
        log P(fine cluster of x | k). None otherwise."""
        return self.policy.identifier

    @property
    def components(self) -> MixtureOfVAEs:
        """This client's model copy: the last aggregate it opened (under CKKS: rounded to the
        release grid on decryption), then its own local training."""
        return self.learner.model

    @property
    def ledger(self) -> PrivacyLedger | None:
        """The privacy ledger (a `PrivacyLedger`), or None under a protocol without DP."""
        return self.policy.ledger

    def receive(self, wire: bytes) -> bytes:
        """The server's message as bytes in, this client's reply as bytes out."""
        return self.endpoint.receive(wire)

    def handle(self, message: Message) -> Message:
        """As `receive`, for a transport that carries decoded messages."""
        return decode(self.endpoint.receive(encode(message)))

    def conclude(self, message: Message) -> None:
        """Take in the server's last message of a run (its final aggregate) without replying:
        this client's model is then the federation's final model."""
        self.spec.validate(message, sender_role="server")
        self._join(message)
        self.policy.conclude(message.round, message.stage, self.codec.open(message, self.spec))

    def _join(self, message: Message) -> None:
        """Bind this client to the run of its first message; refuse any other run's."""
        if not message.run:
            raise ProtocolViolation(f"{self.client_id}: a server message without a run id")
        if self.run_id is None:
            self.run_id = message.run
        elif message.run != self.run_id:
            raise ProtocolViolation(
                f"{self.client_id}: a message from run {message.run[:12]!r}, this client is in run "
                f"{self.run_id[:12]!r} (a replay, or another study's server)"
            )

    def _handle(self, message: Message) -> Message:
        self._join(message)
        if self.outbox is not None:
            run, answered, asked, wire = self.outbox
            if (message.run, message.round, message.stage) == (run, answered, asked):
                return decode(wire)  # a resent message: the reply already sent, byte for byte
            if message.round <= answered:
                raise ProtocolViolation(
                    f"{self.client_id}: round {message.round} ({message.stage}) after answering round "
                    f"{answered}: a replay, refused"
                )
        inbound = self.codec.open(message, self.spec)
        reply = self.policy.respond(message.round, message.stage, inbound)
        stage = self.spec.stage(reply.stage)
        # Only what the protocol declares is sealed at all (secure has no component_index).
        values = {name: v for name, v in reply.values.items() if stage.field(name) is not None}
        events = {name: str(event) for name, event in reply.events.items()}
        payload = build_payload(stage, self.codec.seal(values, stage), events, self.codec.key_id)
        ledger = self.policy.ledger
        declared = {} if ledger is None else ledger.declared(list(reply.events.values()))
        out = Message(reply.stage, message.round, self.client_id, payload, run=message.run, events=declared)
        if self.signing_key is not None:  # signed before the outbox: a resent reply is the same bytes
            out = sign_message(out, self.signing_key, protocol=self.spec.name)
        self.outbox = (message.run, message.round, message.stage, encode(out))
        if self.state_path is not None:
            self._save(self.state_path)  # before the reply leaves: a restart resumes from here
        return out

    def _save(self, path: Path) -> None:
        arrays, metadata = self.policy.state_arrays()
        arrays |= self.learner.state_arrays()
        metadata["client"] = self.client_id
        if self.run_id is not None:
            metadata["run"] = self.run_id
        if self.outbox is not None:
            run, answered, stage, wire = self.outbox
            metadata["outbox"] = json.dumps({"run": run, "round": answered, "stage": stage})
            arrays["outbox"] = np.frombuffer(wire, dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)
        write_atomic(path, data, mode=0o600)  # a fresh temporary file, then rename: never via a link

    def _restore(self, path: Path) -> None:
        # Read as bytes through securegmi.files: a regular file within the cap, never a FIFO or link.
        arrays, metadata = safetensors_arrays(read_bytes(path, STATE_FILE), path)
        if metadata.get("client") != self.client_id:
            raise RunDirectoryError(
                f"{path} holds the state of {metadata.get('client')!r}, not {self.client_id!r}"
            )
        self.run_id = metadata.get("run")
        try:
            if "outbox" in metadata:
                sent = json.loads(metadata["outbox"])
                self.outbox = (
                    str(sent["run"]),
                    int(sent["round"]),
                    str(sent["stage"]),
                    arrays["outbox"].tobytes(),
                )
            self.learner.load_state(arrays)
            self.policy.load_state(arrays, metadata)
        except (KeyError, ValueError, TypeError, ProtocolViolation, RuntimeError) as exc:
            # A missing array, a wrong shape or a garbled field: the constructor fails, so no
            # half-restored client exists.
            raise RunDirectoryError(f"client state {path} is incomplete or corrupt ({exc!r})") from exc


def _policy(
    learner: LocalLearner, privacy: ClientPrivacy | None, signing_key: SigningKey | None
) -> ReleasePolicy:
    """The release policy a client's privacy plan calls for (none without one); its ledger
    entries signed with `signing_key` where given."""
    if privacy is None:
        return PlainRelease(learner)
    if isinstance(privacy.plan, DpPlan):
        return CountsRelease(learner, privacy, signing_key)
    return StatisticsRelease(learner, privacy, signing_key)


def _check_split_stages(spec: ProtocolSpec, plan: PrivateMixturePlan) -> None:
    """Refuse a declaration under which this plan's split noise could be opened short of its
    cohort (docs/design.md §2, law 3): every private aggregate must require the plan's minimum of
    releases and say how many it sums, and a split share may only travel encrypted."""
    required, why = plan.statistics.min_clients, "so a smaller sum would carry less than the planned noise"
    split = plan.statistics.placement == Placement.SPLIT or plan.split_sgd
    if split and spec.codec != "ckks":
        raise PrivacyError(
            f"protocol {spec.name!r} sends releases in the clear, and this client's plan splits its "
            f"noise over {required} clients: a single share would be read with a fraction of the noise. "
            "Use the secure protocol, or a plan with local noise"
        )
    names = {s.name for s in spec.stages}
    for uplink in (*UPLINK.values(), Stage.IDENTIFIER_GRADIENT, Stage.GRADIENT):
        if uplink not in names:
            continue
        down = spec.downlink_after(uplink)
        if spec.min_shares(down.name) < required or down.field(FieldName.CONTRIBUTIONS) is None:
            raise PrivacyError(
                f"protocol {spec.name!r} lets {down.name!r} sum {spec.min_shares(down.name)} client "
                f"releases without saying how many it sums; this client's plan needs at least {required}, "
                f"{why}: build the protocol from the plan "
                "(securegmi.bind_protocol(..., plan=plan, clients=...))"
            )


def _check_protocol(
    spec: ProtocolSpec, components: MixtureOfVAEs, privacy: ClientPrivacy | None, keys: SecretContext | None
) -> None:
    """Refuse a client that could not follow `spec`, before it touches any data."""
    expected = {"K": components.n_components, "P": components.parameter_count()}
    for dim, value in expected.items():
        if dim in spec.dims and spec.dims[dim] != value:
            raise ConfigError(
                f"protocol {spec.name!r} declares {dim} = {spec.dims[dim]}, but these components have "
                f"{dim} = {value}: every client must use the federation's component architecture"
            )
    if privacy is not None and isinstance(privacy.plan, PrivateMixturePlan):
        _check_split_stages(spec, privacy.plan)
    mismatches: list[tuple[bool, type[SecureGMIError], str]] = [
        (
            spec.release == "dp" and privacy is None,
            PrivacyError,
            "sends only differentially private values: pass privacy=ClientPrivacy(plan, ...) with the "
            "federation's DP plan",
        ),
        (
            spec.release == "none" and privacy is not None,
            ConfigError,
            "declares no DP release: drop privacy=, or use the dp protocol",
        ),
        (
            spec.codec == "ckks" and keys is None,
            CryptoError,
            "encrypts every upload: pass keys=SecretContext.load(...) from the federation's "
            "`securegmi keys new`",
        ),
        (spec.codec == "clear" and keys is not None, ConfigError, "sends nothing encrypted: drop keys="),
    ]
    for mismatch, error, why in mismatches:
        if mismatch:
            raise error(f"protocol {spec.name!r} {why}")
