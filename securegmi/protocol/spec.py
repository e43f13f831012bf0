"""Protocol declarations and the validation both ends of a link run on every message."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

import numpy as np

from securegmi.errors import ProtocolViolation
from securegmi.protocol.fields import Ciphertext, FieldKind, field_array
from securegmi.protocol.message import SERVER, Message

Role = Literal["server", "client"]
Dim = int | str  # a fixed size, or a symbol bound when the protocol is instantiated


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: FieldKind
    shape: tuple[Dim, ...]
    dtype: str
    description: str


@dataclass(frozen=True)
class StageSpec:
    name: str
    sender: Role
    fields: tuple[FieldSpec, ...]

    def field(self, name: str) -> FieldSpec | None:
        return next((f for f in self.fields if f.name == name), None)


@dataclass(frozen=True)
class ProtocolSpec:
    """What may cross the boundary, stage by stage and field by field.

    Symbolic dimensions (e.g. "K", "P") are bound with :meth:`bind` before validation.
    """

    name: str
    description: str
    stages: tuple[StageSpec, ...]
    dims: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"protocol {self.name}: duplicate stage names {names}")
        object.__setattr__(self, "dims", MappingProxyType(dict(self.dims)))

    def bind(self, **dims: int) -> ProtocolSpec:
        return replace(self, dims={**self.dims, **dims})

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise ProtocolViolation(f"protocol {self.name!r} has no stage {name!r}")

    def resolve(self, shape: tuple[Dim, ...]) -> tuple[int, ...]:
        try:
            return tuple(d if isinstance(d, int) else int(self.dims[d]) for d in shape)
        except KeyError as exc:
            raise ProtocolViolation(f"protocol {self.name!r}: dimension {exc} is not bound") from exc

    def validate(self, message: Message, *, sender_role: Role, sender: str | None = None) -> None:
        """Raise ProtocolViolation unless `message` is exactly what its stage declares."""
        stage = self.stage(message.stage)
        where = f"{self.name}/{stage.name} from {message.sender!r}"
        if stage.sender != sender_role:
            raise ProtocolViolation(f"{where}: stage is sent by the {stage.sender}, not a {sender_role}")
        if sender is not None and message.sender != sender:
            raise ProtocolViolation(f"{where}: sender claims to be {message.sender!r}, link is {sender!r}")
        if sender_role == "server" and message.sender != SERVER:
            raise ProtocolViolation(f"{where}: server messages must come from {SERVER!r}")
        if message.error is not None:
            return
        declared = {f.name for f in stage.fields}
        extra = sorted(set(message.payload) - declared)
        if extra:
            raise ProtocolViolation(
                f"{where}: undeclared field(s) {extra}; the protocol allows only {sorted(declared)}"
            )
        missing = sorted(declared - set(message.payload))
        if missing:
            raise ProtocolViolation(f"{where}: missing declared field(s) {missing}")
        for spec in stage.fields:
            value = message.payload[spec.name]
            if value.kind is not spec.kind:
                raise ProtocolViolation(
                    f"{where}: field {spec.name!r} is declared {spec.kind.value}, got {value.kind.value}"
                )
            if isinstance(value, Ciphertext):
                continue  # ciphertext structure is checked by the crypto layer
            array = field_array(value)
            expected = self.resolve(spec.shape)
            if array.shape != expected or array.dtype != np.dtype(spec.dtype):
                raise ProtocolViolation(
                    f"{where}: field {spec.name!r} must be {spec.dtype}{list(expected)}, "
                    f"got {array.dtype}{list(array.shape)}"
                )
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                raise ProtocolViolation(f"{where}: field {spec.name!r} holds NaN or infinity")
