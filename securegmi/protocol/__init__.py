"""The protocol vocabulary: field kinds, messages, declarations, validation and transcripts."""

from securegmi.protocol.fields import Ciphertext, DpRelease, Field, FieldKind, NonPrivate, Public
from securegmi.protocol.message import SERVER, Message, decode, encode
from securegmi.protocol.spec import FieldSpec, ProtocolBuilder, ProtocolSpec, StageSpec
from securegmi.protocol.transcript import TranscriptWriter, read_transcript
from securegmi.vocabulary import EventId, EventName, FieldName, Stage

__all__ = [
    "SERVER",
    "Ciphertext",
    "DpRelease",
    "EventId",
    "EventName",
    "Field",
    "FieldKind",
    "FieldName",
    "FieldSpec",
    "Message",
    "NonPrivate",
    "ProtocolBuilder",
    "ProtocolSpec",
    "Public",
    "Stage",
    "StageSpec",
    "TranscriptWriter",
    "decode",
    "encode",
    "read_transcript",
]
