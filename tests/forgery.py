"""What a forger who knows the file formats (but holds no client's key) can redo."""

from __future__ import annotations

from typing import Any

from securegmi.privacy import ledger as ledger_module


def rechain(data: dict[str, Any]) -> None:
    """A ledger file's hash chain recomputed in place, as anyone who knows the format can; its
    signatures dropped (nobody without the client's key can make them anew)."""
    link = ledger_module._genesis(data["client"], data["budget"], data["adjacency"], data.get("noise"))
    for record in data["entries"]:
        record.pop("chain", None)
        record.pop("signature", None)
        link = ledger_module._link(link, record)
        record["chain"] = link
