"""Protocol declarations and the validation both ends of a link run on every message."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Literal, get_args

import numpy as np

from securegmi.errors import ConfigError, ProtocolViolation
from securegmi.protocol.fields import Ciphertext, FieldKind, field_array
from securegmi.protocol.message import SERVER, Message
from securegmi.vocabulary import FieldName, Stage

Role = Literal["server", "client"]
Release = Literal["none", "dp"]  # what the client's values are: as computed, or DP releases
Codec = Literal["clear", "ckks"]  # how they travel: as they are, or encrypted under CKKS
Dim = int | str  # a fixed size, or a symbol bound when the protocol is instantiated


# The JSON form of a declaration (protocol.json): plain values only, read back strictly, so a
# recorded spec is data an auditor can compare, never code.
def _keys(cls: type, data: Any) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    if not isinstance(data, dict) or not set(data) <= names:
        extra = sorted(set(data) - names) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"not the JSON form of a {cls.__name__} (unexpected {extra})")
    return data


def _text(value: Any, what: str, optional: bool = False) -> Any:
    if not (isinstance(value, str) or (optional and value is None)):
        raise ConfigError(f"{what} must be a string, got {value!r}")
    return value


def _choice(value: Any, allowed: Any, what: str) -> Any:
    if value not in get_args(allowed):
        raise ConfigError(f"{what} must be one of {list(get_args(allowed))}, got {value!r}")
    return value


def _dim(value: Any, what: str) -> Dim:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{what} must be a size or a symbol, got {value!r}")
    return value


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: FieldKind
    shape: tuple[Dim, ...]
    dtype: str
    description: str
    # A server field: the sum over clients of the named field of the previous uplink stage.
    sum_of: str | None = None
    # An uplink field whose row i belongs at row `index[i]` of that sum (top-B uploads).
    rows_at: str | None = None
    # A ciphertext field whose values travel at the end of the named ciphertext field's envelope,
    # in the same stage, instead of in chunks of their own: a few values would otherwise cost a
    # whole ciphertext. On the wire it is an empty marker naming its host; its own ledger event
    # still travels with it (and so reaches the transcript).
    packed_in: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "description": self.description,
            "sum_of": self.sum_of,
            "rows_at": self.rows_at,
            "packed_in": self.packed_in,
        }

    @classmethod
    def from_json(cls, data: Any) -> FieldSpec:
        d = _keys(cls, data)
        name = _text(d.get("name"), "a field's name")
        try:
            kind = FieldKind(_text(d.get("kind"), f"field {name!r}: kind"))
        except ValueError:
            raise ConfigError(f"field {name!r}: unknown kind {d.get('kind')!r}") from None
        shape = d.get("shape")
        if not isinstance(shape, list):
            raise ConfigError(f"field {name!r}: shape must be a list, got {shape!r}")
        return cls(
            name,
            kind,
            tuple(_dim(x, f"field {name!r}: a dimension") for x in shape),
            _text(d.get("dtype"), f"field {name!r}: dtype"),
            _text(d.get("description"), f"field {name!r}: description"),
            **{k: _text(d.get(k), f"field {name!r}: {k}", True) for k in ("sum_of", "rows_at", "packed_in")},
        )


@dataclass(frozen=True)
class StageSpec:
    name: str
    sender: Role
    fields: tuple[FieldSpec, ...]
    # A server stage: the fewest client releases its sums may add. Where each of at least m
    # clients adds a share sigma / sqrt(m - 1) of the noise (one curious client knows its own),
    # a sum of fewer than m shares carries less than the planned noise (docs/design.md §2,
    # law 3); such a stage declares `contributions`, which both ends check.
    min_shares: Dim = 1

    def to_json(self) -> dict[str, Any]:
        fields_ = [f.to_json() for f in self.fields]
        return {"name": self.name, "sender": self.sender, "fields": fields_, "min_shares": self.min_shares}

    @classmethod
    def from_json(cls, data: Any) -> StageSpec:
        d = _keys(cls, data)
        name = _text(d.get("name"), "a stage's name")
        items = d.get("fields")
        if not isinstance(items, list):
            raise ConfigError(f"stage {name!r}: fields must be a list, got {items!r}")
        return cls(
            name,
            _choice(d.get("sender"), Role, f"stage {name!r}: sender"),
            tuple(FieldSpec.from_json(f) for f in items),
            _dim(d.get("min_shares", 1), f"stage {name!r}: min_shares"),
        )

    def field(self, name: str) -> FieldSpec | None:
        return next((f for f in self.fields if f.name == name), None)

    def packed(self, host: str) -> tuple[FieldSpec, ...]:
        """The fields whose values travel in `host`'s envelope after its own, in order."""
        return tuple(f for f in self.fields if f.packed_in == host)

    def require(self, name: str) -> FieldSpec:
        found = self.field(name)
        if found is None:
            raise ProtocolViolation(f"stage {self.name!r} declares no field {name!r}")
        return found


@dataclass(frozen=True)
class ProtocolSpec:
    """What may cross the boundary, stage by stage and field by field.

    Symbolic dimensions (e.g. "K", "P") are bound with :meth:`bind` before validation.
    """

    name: str
    description: str
    stages: tuple[StageSpec, ...]
    release: Release
    codec: Codec
    dims: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"protocol {self.name}: duplicate stage names {names}")
        if Stage.START not in names:
            raise ConfigError(f"protocol {self.name}: every protocol opens with a {Stage.START!r} stage")
        uplink = {f.kind for s in self.stages if s.sender == "client" for f in s.fields}
        # The declared release and codec must be what the fields say, so no reader of one can
        # be misled by the other.
        if (FieldKind.CIPHERTEXT in uplink) != (self.codec == "ckks"):
            raise ConfigError(f"protocol {self.name}: codec {self.codec!r} disagrees with its uplink fields")
        protected = bool(uplink & {FieldKind.DP_RELEASE, FieldKind.CIPHERTEXT})
        if protected != (self.release == "dp") or (FieldKind.NON_PRIVATE in uplink and self.release == "dp"):
            raise ConfigError(
                f"protocol {self.name}: release {self.release!r} disagrees with its uplink fields"
            )
        for stage in self.stages:
            for f in stage.fields:
                if f.sum_of is not None and not any(
                    u.sender == "client" and u.field(f.sum_of) for u in self.stages
                ):
                    raise ConfigError(f"protocol {self.name}: {stage.name}.{f.name} sums an unknown field")
        for stage in self.stages:
            for f in stage.fields:
                if f.packed_in is not None:
                    self._check_host(stage, f)
        uplink_fields = {u.name: u for s in self.stages if s.sender == "client" for u in s.fields}
        for stage in self.stages:
            for f in stage.fields:
                if f.sum_of is None:
                    continue
                # Both ends split an envelope by the declaration: a sum is packed exactly when
                # the field it sums is, and in the sum of that field's host.
                packed_sum_of = None if f.packed_in is None else stage.require(f.packed_in).sum_of or "-"
                if packed_sum_of != uplink_fields[f.sum_of].packed_in:
                    raise ConfigError(
                        f"protocol {self.name}: {stage.name}.{f.name} sums {f.sum_of!r}, packed in "
                        f"{uplink_fields[f.sum_of].packed_in!r}; the sum must be packed in that host's sum"
                    )
        object.__setattr__(self, "dims", MappingProxyType(dict(self.dims)))

    def to_json(self) -> dict[str, Any]:
        """The declaration as JSON values (what protocol.json records of the protocol that ran)."""
        return {
            "name": self.name,
            "description": self.description,
            "stages": [s.to_json() for s in self.stages],
            "release": self.release,
            "codec": self.codec,
            "dims": dict(self.dims),
        }

    @classmethod
    def from_json(cls, data: Any) -> ProtocolSpec:
        """The spec `to_json` wrote; a `ConfigError` for anything else. Validated as on
        construction, so a recorded declaration holds the same invariants as a built one."""
        d = _keys(cls, data)
        name = _text(d.get("name"), "a protocol's name")
        stages, dims = d.get("stages"), d.get("dims")
        if not isinstance(stages, list) or not isinstance(dims, dict):
            raise ConfigError(f"protocol {name!r}: stages must be a list and dims an object")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in dims.values()):
            raise ConfigError(f"protocol {name!r}: every bound dimension must be an integer, got {dims}")
        return cls(
            name,
            _text(d.get("description"), f"protocol {name!r}: description"),
            tuple(StageSpec.from_json(s) for s in stages),
            _choice(d.get("release"), Release, f"protocol {name!r}: release"),
            _choice(d.get("codec"), Codec, f"protocol {name!r}: codec"),
            dims,
        )

    def _check_host(self, stage: StageSpec, f: FieldSpec) -> None:
        """A packed field rides in a ciphertext host of its own stage that is not packed itself."""
        where = f"protocol {self.name}: {stage.name}.{f.name} packed in {f.packed_in!r}"
        host = stage.field(f.packed_in or "")
        if host is None or host.packed_in is not None:
            raise ConfigError(f"{where}: the host must be an unpacked field of the same stage")
        if f.kind is not FieldKind.CIPHERTEXT or host.kind is not FieldKind.CIPHERTEXT:
            raise ConfigError(f"{where}: only ciphertext fields share an envelope")
        if f.rows_at is not None or host.rows_at is not None:
            raise ConfigError(f"{where}: rows placed by an index cannot share an envelope")

    def envelope(self, host: FieldSpec) -> tuple[tuple[FieldSpec, tuple[int, ...]], ...]:
        """What `host`'s ciphertext envelope carries, in order: its own values, then those of the
        fields packed in it, each with its shape."""
        stage = next((s for s in self.stages if any(f is host for f in s.fields)), None)
        if stage is None:
            raise ProtocolViolation(f"protocol {self.name!r} does not declare field {host.name!r}")
        return tuple((f, self.resolve(f.shape)) for f in (host, *stage.packed(host.name)))

    def bind(self, **dims: int) -> ProtocolSpec:
        return replace(self, dims={**self.dims, **dims})

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise ProtocolViolation(f"protocol {self.name!r} has no stage {name!r}")

    def min_shares(self, stage: str) -> int:
        """The fewest client releases the server stage `stage` may sum (1 if it says nothing)."""
        (value,) = self.resolve((self.stage(stage).min_shares,))
        return value

    def downlink_after(self, uplink: str) -> StageSpec:
        """The server stage that returns the sums of the clients' `uplink` stage."""
        fields = {f.name for f in self.stage(uplink).fields}
        for s in self.stages:
            if s.sender == "server" and any(f.sum_of in fields for f in s.fields):
                return s
        raise ProtocolViolation(f"protocol {self.name!r} declares no server stage after {uplink!r}")

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
        named = {e for f in message.payload.values() if (e := getattr(f, "event", None)) is not None}
        if sender_role == "client" and named != set(message.events):
            raise ProtocolViolation(
                f"{where}: the message declares the parameters of events {sorted(message.events)}, its "
                f"fields name {sorted(named)}; each release's event travels with it so that the "
                "server's transcript records what it claims"
            )
        for spec in stage.fields:
            value = message.payload[spec.name]
            if value.kind is not spec.kind:
                raise ProtocolViolation(
                    f"{where}: field {spec.name!r} is declared {spec.kind.value}, got {value.kind.value}"
                )
            if isinstance(value, Ciphertext):
                if value.packed_in != spec.packed_in:
                    raise ProtocolViolation(
                        f"{where}: ciphertext field {spec.name!r} must travel "
                        + (f"packed in {spec.packed_in!r}" if spec.packed_in else "in its own envelope")
                        + (f", it claims {value.packed_in!r}" if value.packed_in else ", it has its own")
                    )
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
        if stage.sender == "server" and stage.field(FieldName.CONTRIBUTIONS) is not None:
            summed, required = (
                int(field_array(message.payload[FieldName.CONTRIBUTIONS])),
                self.min_shares(stage.name),
            )
            if summed < required:
                raise ProtocolViolation(
                    f"{where}: the aggregate sums {summed} client releases, the protocol requires at "
                    f"least {required}; a sum of fewer noise shares carries less than the planned "
                    "noise, so it is refused"
                )


# A protocol module's `build(components=K, parameters=P, top_b=B, [statistics=...])`.
ProtocolBuilder = Callable[..., ProtocolSpec]
