"""Find a CKKS secret anywhere in an object graph: the walk follows everything an object can
reach (instance dicts, __slots__, containers and their keys, closures, default arguments, bound
methods, partials, and the properties of securegmi's own classes) and reports the path to every
secret it finds: a `SecretContext`, a TenSEAL context holding a secret key, SEAL's secret key or
the objects built from it (a decryptor, a symmetric encryptor, a key generator), a client's
Ed25519 signing key, its X25519 masking key, or bytes containing a serialised secret."""

from __future__ import annotations

import functools
import types
from collections import deque
from collections.abc import Iterator, Mapping

import numpy as np
import tenseal as ts
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from tenseal import sealapi

from securegmi.crypto.keys import SecretContext
from securegmi.crypto.masking import MaskingKey
from securegmi.crypto.signing import SigningKey

# A client's Ed25519 signing key (crypto.signing) and its X25519 masking key (crypto.masking)
# are client secrets too.
SECRET_TYPES = (
    SecretContext,
    sealapi.SecretKey,
    sealapi.Decryptor,
    sealapi.Encryptor,
    sealapi.KeyGenerator,
    SigningKey,
    Ed25519PrivateKey,
    MaskingKey,
    X25519PrivateKey,
)
_LEAVES = (
    str,
    int,
    float,
    complex,
    bool,
    type(None),
    type,
    types.ModuleType,
    torch.Tensor,
    bytes,
    bytearray,
    memoryview,
)


def _is_secret(obj: object, secret_bytes: tuple[bytes, ...]) -> bool:
    if isinstance(obj, SECRET_TYPES):
        return True
    if isinstance(obj, ts.Context):
        return obj.has_secret_key() or obj.is_private()
    if isinstance(obj, bytes | bytearray | memoryview):
        data = bytes(obj)
        return any(s in data for s in secret_bytes)
    return False


def _slots(obj: object) -> Iterator[tuple[str, object]]:
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                yield f".{name}", getattr(obj, name)


def _properties(obj: object) -> Iterator[tuple[str, object]]:
    """Properties of securegmi's classes: what an attribute read would hand out."""
    for cls in type(obj).__mro__:
        if not cls.__module__.startswith("securegmi"):
            continue
        for name, member in vars(cls).items():
            if isinstance(member, property | functools.cached_property):
                try:
                    yield f".{name}", getattr(obj, name)
                except Exception:  # a property that needs state the object lacks
                    continue


def _children(obj: object) -> Iterator[tuple[str, object]]:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield f"[key {key!r}]", key
            yield f"[{key!r}]", value
        return
    if isinstance(obj, list | tuple | set | frozenset | deque):
        for i, item in enumerate(obj):
            yield f"[{i}]", item
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            for i, item in enumerate(obj.ravel()):
                yield f"[{i}]", item
        return
    if isinstance(obj, types.MethodType):
        yield ".__self__", obj.__self__
        yield ".__func__", obj.__func__
        return
    if isinstance(obj, functools.partial):
        yield ".func", obj.func
        yield ".args", obj.args
        yield ".keywords", obj.keywords
        return
    if isinstance(obj, types.FunctionType):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=True):
            try:
                yield f"<closure {name}>", cell.cell_contents
            except ValueError:  # an empty cell
                continue
        yield ".__defaults__", obj.__defaults__
        yield ".__kwdefaults__", obj.__kwdefaults__
        return
    if hasattr(obj, "__dict__"):
        yield from ((f".{k}", v) for k, v in vars(obj).items())
    yield from _slots(obj)
    yield from _properties(obj)


def secret_holders(root: object, secret_bytes: tuple[bytes, ...] = ()) -> list[str]:
    """The path from `root` to every secret reachable from it (breadth first, each object once)."""
    seen: set[int] = set()
    alive: list[object] = []  # property values stay referenced, so their ids are never reused
    found: list[str] = []
    queue: deque[tuple[str, object]] = deque([("root", root)])
    while queue:
        path, obj = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        alive.append(obj)
        if _is_secret(obj, secret_bytes):
            found.append(f"{path}: {type(obj).__name__}")
            continue
        if isinstance(obj, _LEAVES):
            continue
        queue.extend((path + step, child) for step, child in _children(obj))
    return found


def secret_serialisations(keys: SecretContext) -> tuple[bytes, ...]:
    """The bytes a leaked secret would most likely take: the secret context as TenSEAL writes it
    (`securegmi keys new`), and SEAL's secret key alone."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "sk"
        keys.context.secret_key().data.save(str(path))
        return keys.context.serialize(save_secret_key=True), path.read_bytes()
