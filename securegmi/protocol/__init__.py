"""The protocol vocabulary: field kinds, messages, declarations, validation and transcripts."""

from securegmi.protocol.fields import Ciphertext, DpRelease, Field, FieldKind, NonPrivate, Public
from securegmi.protocol.message import SERVER, Message, decode, encode
from securegmi.protocol.spec import START, FieldSpec, ProtocolBuilder, ProtocolSpec, StageSpec
from securegmi.protocol.transcript import TranscriptWriter, read_transcript

__all__ = [
    "SERVER",
    "START",
    "Ciphertext",
    "DpRelease",
    "Field",
    "FieldKind",
    "FieldSpec",
    "Message",
    "NonPrivate",
    "ProtocolBuilder",
    "ProtocolSpec",
    "Public",
    "StageSpec",
    "TranscriptWriter",
    "decode",
    "encode",
    "read_transcript",
]
