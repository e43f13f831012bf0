"""Faults on the default federation (digits, 20 clients, `--epsilon 8`: secure, statistics design,
split noise), one scenario per run, side by side with a clean run:

- a client that fails while answering the statistics phase, or the VAE phase (a dropout);
- a client that does not answer before the round's deadline (its transport times out);
- a replayed reply (a client's previous round's reply, resent);
- a corrupted ciphertext (bytes flipped in one upload);
- a reply signed as another client;
- `kill -9` of the whole `securegmi simulate` process group mid-run, then `securegmi resume`.

For each: rounds completed of those planned, records lost (planned rounds missing from the
metrics, plus releases in the transcript that no ledger covers: must be 0), the epsilon the
largest ledger charged against the plan's, what the server refused, and the audit's verdict.

    python bench/faults.py [--clients 20] [--quick]     # writes bench/results/faults.json

The in-process scenarios run the shipped runner with its transport replaced by one that injects
the fault (`runner.InProcessTransport`, patched here only); the kill scenario runs the real CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from safetensors import safe_open

from securegmi.config import SimulationConfig
from securegmi.errors import RunAbortedError
from securegmi.federation.transport import InProcessTransport
from securegmi.protocol import Ciphertext, Message, decode, encode
from securegmi.records.audit import audit_run
from securegmi.records.rundir import SERVER_STATE
from securegmi.simulation import runner

RESULTS = Path(__file__).parent / "results" / "faults.json"
VICTIM = "client-3"

Fault = Callable[[str, Message, bytes, dict[str, Any]], bytes]


def _fail_at(phase: str) -> Fault:
    def fault(cid: str, message: Message, reply: bytes, memory: dict[str, Any]) -> bytes:
        statistics = message.stage in ("start", "moment_totals", "cluster_totals")
        if cid == VICTIM and not memory.get("done") and statistics == (phase == "statistics"):
            memory["done"] = True
            raise RuntimeError(f"{cid} failed in the {phase} phase")
        return reply

    return fault


def _timeout(cid: str, message: Message, reply: bytes, memory: dict[str, Any]) -> bytes:
    if cid == VICTIM and message.round == 4:
        raise TimeoutError(f"{cid}: no reply before the round's deadline")
    return reply


def _replay(cid: str, message: Message, reply: bytes, memory: dict[str, Any]) -> bytes:
    if cid != VICTIM:
        return reply
    previous, memory["last"] = memory.get("last"), reply
    return previous if message.round == 5 and previous is not None else reply


def _corrupt(cid: str, message: Message, reply: bytes, memory: dict[str, Any]) -> bytes:
    if cid != VICTIM or message.round != 5:
        return reply
    decoded = decode(reply)
    payload = {}
    for name, f in decoded.payload.items():
        if isinstance(f, Ciphertext):
            data = bytearray(f.data)
            data[len(data) // 2] ^= 0xFF  # inside the first chunk's polynomial data
            f = Ciphertext(bytes(data), f.key_id, f.event)
        payload[name] = f
    return encode(Message(decoded.stage, decoded.round, decoded.sender, payload, run=decoded.run))


def _wrong_sender(cid: str, message: Message, reply: bytes, memory: dict[str, Any]) -> bytes:
    if cid != VICTIM or message.round != 5:
        return reply
    d = decode(reply)
    return encode(Message(d.stage, d.round, "client-4", d.payload, run=d.run))


SCENARIOS: dict[str, Fault | None] = {
    "none (clean run)": None,
    "client fails in the statistics phase": _fail_at("statistics"),
    "client fails in the VAE phase": _fail_at("vae"),
    "no reply before the deadline": _timeout,
    "replayed reply": _replay,
    "corrupted ciphertext": _corrupt,
    "reply signed as another client": _wrong_sender,
}


class FaultyTransport(InProcessTransport):
    fault: Fault | None = None
    memory: ClassVar[dict[str, Any]] = {}

    def deliver(self, client_id: str, wire: bytes) -> bytes:
        reply, fault = super().deliver(client_id, wire), FaultyTransport.fault  # a plain function
        return reply if fault is None else fault(client_id, decode(wire), reply, self.memory)


def _outcome(run_dir: Path, planned: int, seconds: float) -> dict[str, Any]:
    config = SimulationConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run_dir / "results.json").read_text())
    first_vae = planned - config.vae_rounds * (config.sgd_steps if config.split_sgd else 1)
    missing = len(set(range(first_vae, planned)) - {m["round"] for m in metrics})
    report = audit_run(run_dir)
    uncovered = sum(len(d.uncovered_events) for d in report.disclosures)
    refusals = [
        row
        for row in map(json.loads, (run_dir / "transcript.jsonl").read_text().splitlines())
        if row.get("status") in ("refused", "rejected")
    ]
    return {
        "rounds_completed": results["rounds"],
        "rounds_planned": planned,
        "records_lost": missing + uncovered,
        "epsilon_charged_max": max(b.epsilon for b in report.budgets),
        "epsilon_planned": config.epsilon,
        "refused_or_rejected": sorted({f"round {r['round']} {r['sender']}" for r in refusals}),
        "source_accuracy": results["source_accuracy"],
        "audit_ok": report.ok,
        "audit_problems": list(report.problems),
        "seconds": round(seconds, 1),
    }


def run_in_process(config: SimulationConfig, fault: Fault | None, out: Path) -> dict[str, Any]:
    """One run with `fault` injected. A round the fault leaves below the minimum cohort is
    abandoned and the run stops; it is then resumed with the site back (no fault)."""
    FaultyTransport.fault, FaultyTransport.memory = fault, {}
    runner.InProcessTransport = FaultyTransport  # type: ignore[misc]  # this bench's fault injection
    started, stopped = time.perf_counter(), None
    try:
        runner.run_simulation(config, out=out)
    except RunAbortedError as exc:
        stopped = str(exc)
        FaultyTransport.fault = None
        runner.run_simulation(config, out=out, resume=True)
    finally:
        runner.InProcessTransport = InProcessTransport  # type: ignore[misc]
    return _outcome(out, config.planned_rounds, time.perf_counter() - started) | {
        "stopped_then_resumed": stopped
    }


def _saved_round(run_dir: Path) -> int:
    try:
        with safe_open(str(run_dir / SERVER_STATE), framework="numpy") as fh:
            return int((fh.metadata() or {})["next_round"])
    except Exception:
        return -1


def kill_and_resume(config: SimulationConfig, out: Path, at_round: int) -> dict[str, Any]:
    cli = [sys.executable, "-c", "from securegmi.cli.main import main; main()"]
    args = ["--clients", str(config.clients), "--epsilon", str(config.epsilon), "--out", str(out)]
    started = time.perf_counter()
    process = subprocess.Popen(
        [*cli, "simulate", *args],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while _saved_round(out) < at_round and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = _saved_round(out)
    subprocess.run([*cli, "resume", str(out)], check=True, stdout=subprocess.DEVNULL)
    outcome = _outcome(out, config.planned_rounds, time.perf_counter() - started)
    ledgers = [json.loads(p.read_text()) for p in sorted((out / "ledgers").glob("*.json"))]
    repeated = sum(
        len(keys) - len(set(keys))
        for keys in ([(e["round"], e["name"]) for e in g["entries"]] for g in ledgers)
    )
    digests: dict[tuple[int, str, str], set[str]] = {}
    for row in map(json.loads, (out / "transcript.jsonl").read_text().splitlines()):
        if row["sender"] != "server" and row.get("field"):
            digests.setdefault((row["round"], row["sender"], row["field"]), set()).add(row["sha256"])
    return outcome | {
        "killed_after_round": killed_at,
        "repeated_ledger_entries": repeated,
        "releases_drawn_twice": sum(len(d) > 1 for d in digests.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="synthetic data, for a smoke test")
    args = parser.parse_args()
    dataset = "synthetic" if args.quick else "digits"
    config = SimulationConfig(dataset=dataset, clients=args.clients, protocol="secure", epsilon=8.0)
    # The default minimum cohort is every client: one dropout abandons the round. The fault
    # scenarios run with one dropout tolerated, and the default is shown on its own.
    tolerant = replace(config, min_clients=args.clients - 1)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as work:
        runs = [
            (f"{name} (min cohort {args.clients - 1})", tolerant, fault) for name, fault in SCENARIOS.items()
        ]
        default = f"client fails (min cohort {args.clients}, the default)"
        runs.append((default, config, _fail_at("statistics")))
        for i, (name, study, fault) in enumerate(runs):
            rows[name] = run_in_process(study, fault, Path(work) / f"s{i}")
            print(f"{name:50s} {json.dumps({k: v for k, v in rows[name].items() if k != 'audit_problems'})}")
        if not args.quick:  # the CLI runs the default dataset
            rows["kill -9 mid-run, then resume"] = kill_and_resume(config, Path(work) / "kill", at_round=6)
            print(f"{'kill -9 mid-run, then resume':38s} {json.dumps(rows['kill -9 mid-run, then resume'])}")
    RESULTS.write_text(json.dumps({"config": config.to_dict(), "scenarios": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
