"""Transports carry encoded messages between the server and its clients.

Both ends validate every message against the protocol: the client end before anything leaves
the client (an undeclared field is never sent), the server end on receipt (a client that skips
its own check is still refused). The in-process transport is the twin that Flower later replaces.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from securegmi.crypto.signing import SignerRegistry
from securegmi.errors import ProtocolViolation, RefusalError
from securegmi.protocol import SERVER, Message, ProtocolSpec, TranscriptWriter, decode, encode
from securegmi.protocol.signed import verify_message

Handler = Callable[[Message], Message]


def client_refusal(exc: BaseException) -> str:
    """What the server may record of a client's failure: its class, never its text. A client's
    message can hold data-derived values (an encryption refusal names the magnitude of the value
    it would not encrypt; a budget refusal, the epsilon spent), and the server's records hold
    no data-derived value (docs/design.md §5). The site keeps the full message on its side."""
    return f"refused by the client ({type(exc).__name__})"


def recorded_refusal(reason: str) -> str:
    """A refusal reason that arrived from a client, as the server records it: only in the form
    `client_refusal` gives, so a client (or a site's older code) cannot write free text into the
    server's transcript."""
    return reason if _REFUSAL.fullmatch(reason) else "refused by the client (reason withheld)"


_REFUSAL = re.compile(r"refused by the client \([A-Za-z]+\)")


class ClientEndpoint:
    """The client's end of a link: validate inbound, handle, validate outbound, encode."""

    def __init__(
        self, client_id: str, handler: Handler, spec: ProtocolSpec, transcript: TranscriptWriter | None = None
    ) -> None:
        self.client_id = client_id
        self.handler = handler
        self.spec = spec
        self.transcript = transcript  # the site's own record of what arrived and what left

    def receive(self, wire: bytes) -> bytes:
        inbound = decode(wire)
        self.spec.validate(inbound, sender_role="server")
        if self.transcript is not None:
            self.transcript.record(inbound, wire, receiver=self.client_id)
        reply = self.handler(inbound)
        # The outbound check runs before encoding: a violation means nothing leaves the client.
        self.spec.validate(reply, sender_role="client", sender=self.client_id)
        out = encode(reply)
        if self.transcript is not None:
            self.transcript.record(reply, out, receiver=SERVER)
        return out


class ServerEndpoint:
    """The server's end: validate and record what it sends, decode, validate and record replies.
    With `signers` (the study's registry of the clients' public keys), a reply is accepted only
    under its client's signature."""

    def __init__(
        self, spec: ProtocolSpec, transcript: TranscriptWriter | None, signers: SignerRegistry | None = None
    ) -> None:
        self.spec = spec
        self.transcript = transcript
        self.signers = signers

    def send(self, client_id: str, message: Message) -> bytes:
        self.spec.validate(message, sender_role="server")
        wire = encode(message)
        if self.transcript is not None:
            self.transcript.record(message, wire, receiver=client_id)
        return wire

    def accept(self, client_id: str, wire: bytes) -> Message:
        reply = decode(wire)
        signed = reply
        if reply.error is not None:
            # A client's own error text is never recorded, only its allowed form.
            reply = replace(reply, error=recorded_refusal(reply.error))
        try:
            if self.signers is not None:  # checked on what arrived, against the link's client
                verify_message(signed, self.signers, client_id, protocol=self.spec.name)
            self.spec.validate(reply, sender_role="client", sender=client_id)
        except ProtocolViolation:
            if self.transcript is not None:
                self.transcript.record(reply, wire, receiver=SERVER, status="rejected")
            raise
        if self.transcript is not None:
            self.transcript.record(reply, wire, receiver=SERVER)
        return reply

    def refuse(self, client_id: str, message: Message, reason: str) -> None:
        if self.transcript is not None:
            self.transcript.record_refusal(
                round=message.round, stage=message.stage, sender=client_id, receiver=SERVER, reason=reason
            )


@dataclass(frozen=True)
class Exchange:
    """The replies the server accepted, and why each other client's reply was refused."""

    replies: dict[str, Message]
    refused: dict[str, str] = field(default_factory=dict)


class Transport(ABC):
    """How the server's messages reach its clients and their replies come back: in this process
    (`InProcessTransport`), over Flower (`securegmi.adapters.flower`), or over your own wire.
    `play_round` and `run_federation` take any of them."""

    @abstractmethod
    def exchange(self, outgoing: Mapping[str, Message]) -> Exchange:
        """Deliver each message to its client and collect the validated replies."""


class _Site(Protocol):
    """A `Client` as a transport sees it: its id and its end of the link."""

    client_id: str

    @property
    def endpoint(self) -> ClientEndpoint: ...


class _Hub(Protocol):
    """A `Server` as a transport sees it: its end of the link."""

    @property
    def endpoint(self) -> ServerEndpoint: ...


class InProcessTransport(Transport):
    """Server and clients in one process: the message bytes handed over directly, each end
    checking them as over a network."""

    def __init__(self, server: ServerEndpoint, clients: Mapping[str, ClientEndpoint]) -> None:
        self.server = server
        self.clients = dict(clients)

    @classmethod
    def linking(cls, server: _Hub, clients: Iterable[_Site]) -> InProcessTransport:
        """The transport between a `Server` and its `Client`s, by their ids."""
        return cls(server.endpoint, {c.client_id: c.endpoint for c in clients})

    def deliver(self, client_id: str, wire: bytes) -> bytes:
        """Hand bytes to a client and return its reply bytes (a test spy overrides this)."""
        return self.clients[client_id].receive(wire)

    def exchange(self, outgoing: Mapping[str, Message]) -> Exchange:
        replies: dict[str, Message] = {}
        refused: dict[str, str] = {}
        for client_id, message in outgoing.items():
            wire = self.server.send(client_id, message)
            try:
                answer = self.deliver(client_id, wire)
            except RefusalError as exc:
                # The client sent nothing (its own check or its ledger refused); the round
                # completes with the others.
                reason = client_refusal(exc)
            except Exception as exc:
                # A site that fails mid-round (a crash, a full disk) drops out of the round, as
                # one that times out over a network would; what it committed to its ledger
                # before failing stays charged.
                reason = f"dropped out ({type(exc).__name__})"
            else:
                try:
                    replies[client_id] = self.server.accept(client_id, answer)
                    continue
                except ProtocolViolation as exc:
                    reason = str(exc)  # the server's own check: public facts of the message
            refused[client_id] = reason
            self.server.refuse(client_id, message, reason)
        return Exchange(replies, refused)
