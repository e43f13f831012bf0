"""Commands on what a run left behind (`report`, `infer`, `audit`) and the key ceremony."""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, cast

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from securegmi.errors import ConfigError, DataError, RunDirectoryError

from .app import app, console, errors_as_messages, keys_app

COMPONENTS_HELP = (
    "for a run of your own components (securegmi.save): the factory you built them with, as "
    "module:function or path/to/file.py:function"
)


@app.command()
@errors_as_messages
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (securegmi simulate, or securegmi.save)")],
    components: Annotated[str | None, typer.Option(help=COMPONENTS_HELP)] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="print the run's results.json and the plots written, as JSON")
    ] = False,
) -> None:
    """Write PNG plots of a run: true (where known) vs estimated pi per client, accuracy and pi
    error per round, samples of each component (image data) and, for a private run, epsilon
    spent per round."""
    from securegmi.records.rundir import read_run

    from .plots import write_plots

    paths = write_plots(run_dir, _component_factory(components))
    if json_output:
        results, _ = read_run(run_dir)
        console.print_json(json.dumps({"results": results, "plots": [str(p) for p in paths]}))
        return
    for path in paths:
        console.print(f"wrote {escape(str(path))}")


def _component_factory(spec: str | None) -> Callable[[], Any] | None:
    """The user's component factory named as module:function or file.py:function. It is their
    own code, named by them on their own machine: importing it runs it, as `python file.py` would."""
    import importlib
    import importlib.util

    if spec is None:
        return None
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise ConfigError(f"--components {spec!r}: name the factory as module:function or file.py:function")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ConfigError(f"--components: {path} is not a file")
            loader = importlib.util.spec_from_file_location(f"_securegmi_components_{path.stem}", path)
            if loader is None or loader.loader is None:
                raise ConfigError(f"--components: cannot import {path}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as exc:
        raise ConfigError(f"--components: cannot import {where!r} ({exc})") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"--components: {where} has no function {name!r}")
    return cast("Callable[[], Any]", factory)


@keys_app.command("new")
@errors_as_messages
def keys_new(
    # A str, not a Path: Path("") is ".", and an empty --out must not mean the current directory.
    out: Annotated[str, typer.Option(help="directory for secret.ckks (mode 0600) and public.ckks")],
) -> None:
    """Create a study's CKKS keys: share secret.ckks with the clients out of band; give the
    server public.ckks only (it can add ciphertexts, never decrypt or encrypt)."""
    from securegmi.crypto.keys import SecretContext
    from securegmi.crypto.params import CkksParameters

    if not out.strip():
        raise ConfigError("--out is empty: name the directory to write secret.ckks and public.ckks to")
    directory = Path(out)
    SecretContext.check_destination(directory)  # before the (slow) key generation
    keys = SecretContext.generate(CkksParameters())
    secret_path, public_path = keys.save(directory)
    console.print(f"secret context (clients only, mode 0600): {escape(str(secret_path))}")
    console.print(f"public context (the server):             {escape(str(public_path))}")
    console.print(f"key id: {keys.key_id}")


@keys_app.command("signing")
@errors_as_messages
def keys_signing(
    out: Annotated[
        str, typer.Option(help="directory for each <client>.ed25519 (mode 0600) and signers.json")
    ],
    clients: Annotated[int, typer.Option(min=1, help="how many clients (client-0 ... client-N-1)")],
) -> None:
    """Create every client's Ed25519 signing key and the registry of their public keys: give
    each client its own <client>.ed25519 only (out of band), register signers.json with the
    study (its fingerprint too) and give it to the server (run config 'signers') and auditors
    (`securegmi audit --signers`)."""
    from securegmi.crypto.signing import SIGNERS_FILE, SignerRegistry, SigningKey

    if not out.strip():
        raise ConfigError("--out is empty: name the directory to write the signing keys to")
    directory = Path(out)
    ids = [f"client-{i}" for i in range(clients)]
    taken = [p for p in (SigningKey.path_in(directory, c) for c in ids) if os.path.lexists(p)]
    if taken or os.path.lexists(directory / SIGNERS_FILE):
        first = taken[0] if taken else directory / SIGNERS_FILE
        raise ConfigError(f"{first} exists: refusing to overwrite a key")
    keys = {cid: SigningKey.generate(cid) for cid in ids}
    for key in keys.values():
        key.save(directory)
    registry = SignerRegistry.of(keys)
    registry.save(directory / SIGNERS_FILE)
    console.print(f"signing keys (one per client, mode 0600): {escape(str(directory))}/client-*.ed25519")
    console.print(f"registry (the study, the server, auditors): {escape(str(directory / SIGNERS_FILE))}")
    console.print(f"registry fingerprint: {registry.fingerprint}")


@app.command()
@errors_as_messages
def infer(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    data: Annotated[
        Path, typer.Option(help="records as rows: .npy, or .csv of numbers (a header row is skipped)")
    ],
    json_output: Annotated[bool, typer.Option("--json", help="print pi and counts as JSON")] = False,
    out: Annotated[
        str | None, typer.Option(help="write per-record assignments and responsibilities (CSV)")
    ] = None,
    components: Annotated[str | None, typer.Option(help=COMPONENTS_HELP)] = None,
) -> None:
    """Estimate the mixture proportions of a site's records and assign each to a component."""
    from securegmi.records.trained import load

    target = _csv_destination(out) if out is not None else None  # refused before any work
    model = load(run_dir, components=_component_factory(components))
    x = _read_records(data)
    pi = model.estimate_pi(x)
    r = model.responsibilities(x, pi)
    assigned = r.argmax(1)
    counts = np.bincount(assigned, minlength=model.n_components)
    summary = {"records": len(x), "pi": pi.round(6).tolist(), "assigned_counts": counts.tolist()}
    if target is not None:
        from securegmi.files import write_atomic

        header = "record,component," + ",".join(f"r{k}" for k in range(model.n_components))
        rows = np.column_stack([np.arange(len(x)), assigned, r])
        text = io.StringIO()
        np.savetxt(
            text, rows, delimiter=",", header=header, comments="", fmt=["%d", "%d", *["%.6f"] * r.shape[1]]
        )
        write_atomic(target, text.getvalue().encode(), error=ConfigError)
        summary["out"] = str(target)
    if json_output:
        console.print_json(json.dumps(summary))
        return
    table = Table(title=escape(f"{len(x)} records from {data.name} (components of {run_dir})"))
    for col in ("component", "estimated pi", "records assigned"):
        table.add_column(col, justify="right")
    for k in range(model.n_components):
        table.add_row(str(k), f"{pi[k]:.3f}", str(counts[k]))
    console.print(table)


def _csv_destination(out: str) -> Path:
    """Where `infer --out` may write: a file (not a directory, link, FIFO or device), and never a
    record of a run directory (its config.json, transcript, ledgers, model, results ...)."""
    from securegmi.files import refuse_link
    from securegmi.records.rundir import is_run_record

    if not out.strip():
        raise ConfigError("--out is empty: name the CSV file to write")
    path = Path(out)
    if path.is_dir() and not path.is_symlink():
        raise ConfigError(f"--out {path} is a directory: name the CSV file to write in it")
    refuse_link(path, ConfigError)
    if is_run_record(path):
        raise RunDirectoryError(
            f"--out {path} is among the records of a run directory: refusing to write there; "
            "write the CSV elsewhere"
        )
    if not path.parent.is_dir():
        raise ConfigError(f"--out {path}: the directory {path.parent} does not exist")
    return path


def _read_records(path: Path) -> np.ndarray:
    """A site's records from a regular .npy or .csv file within RECORDS_FILE's cap, read as bytes
    first (so a FIFO or device named as --data is refused, never waited on)."""
    from securegmi.files import RECORDS_FILE, read_bytes

    if path.suffix not in (".npy", ".csv"):
        raise DataError(f"{path}: records must be a .npy or .csv file")
    if not os.path.lexists(path):
        raise DataError(f"{path} does not exist")
    raw = read_bytes(path, RECORDS_FILE, DataError)
    if not raw.strip():
        raise DataError(f"{path} holds no records")
    try:
        if path.suffix == ".npy":
            records: np.ndarray = np.load(io.BytesIO(raw), allow_pickle=False)  # never unpickle data
        else:
            text = raw.decode("utf-8")
            with warnings.catch_warnings():  # numpy warns of a header-only file: the error says it
                warnings.simplefilter("ignore")
                try:
                    records = np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2)
                except ValueError:
                    records = np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2, skiprows=1)
    except (OSError, ValueError, EOFError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise DataError(f"cannot read records from {path}: {' '.join(str(exc).split())[:160]}") from None
    if not isinstance(records, np.ndarray) or records.dtype.kind not in "fiub":
        raise DataError(f"{path} does not hold an array of numbers")
    return records


@app.command()
@errors_as_messages
def export(
    server_dir: Annotated[Path, typer.Argument(help="the Flower server's run directory (its run-dir)")],
    site: Annotated[
        list[Path],
        typer.Option(help="a site's directory (its state-dir: client-states/ and ledgers/); once per site"),
    ],
    out: Annotated[Path, typer.Option(help="the run directory to write")],
    key_dir: Annotated[
        Path | None, typer.Option(help="the sites' CKKS key directory (secret.ckks): the secure protocol")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a run already in --out")] = False,
) -> None:
    """Make a Flower deployment's records one run directory that load, audit, infer and report
    take: a site holding the key opens the final aggregate (the server cannot), and every
    site's ledger and pi are gathered beside the server's transcript."""
    from securegmi.adapters.deployment import export_deployment

    result = export_deployment(server_dir, site, out, key_dir=key_dir, overwrite=overwrite)
    console.print(
        escape(
            f"wrote {out}: source accuracy {result.evaluation.source_accuracy:.3f}, "
            f"pi TV error {result.evaluation.pi_tv_error:.3f}"
        )
    )


@app.command()
@errors_as_messages
def audit(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (securegmi simulate, or securegmi.save)")],
    ledgers: Annotated[
        Path | None,
        typer.Option(
            help="the folder of the clients' ledgers (<client>.json each) when RUN_DIR holds none, "
            "as a Flower server's directory (or make it a run directory: securegmi export)"
        ),
    ] = None,
    trust_recorded_protocol: Annotated[
        bool,
        typer.Option(
            help="accept a run under a protocol not installed here, checked against the declaration "
            "its protocol.json holds alone (which whoever wrote the directory could have rewritten)"
        ),
    ] = False,
    signers: Annotated[
        Path | None,
        typer.Option(
            help="the registry of the clients' public signing keys the study registered (signers.json "
            "from the key ceremony): every message and ledger entry must verify under it; without it "
            "the run directory's own copy is used, which shows the records self-consistent only"
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Report what left every client, its protection, and the privacy spent; exit 1 on any
    uncovered field, exceeded budget, or signature that is missing or does not verify."""
    from securegmi.records.audit import audit_run

    report = audit_run(
        run_dir, ledgers=ledgers, trust_recorded_protocol=trust_recorded_protocol, signers=signers
    )
    if json_output:
        console.print_json(json.dumps(report.to_dict()))
    else:
        _print_audit(report)
    if not report.ok:
        raise typer.Exit(code=1)


def _print_audit(report: Any) -> None:
    if report.budgets:
        table = Table(title=escape(f"Privacy spent per client (protocol {report.protocol})"))
        for col in (
            "client",
            "releases",
            "epsilon (PLD)",
            "RDP cross-check",
            "as received",
            "server + 1 client",
            "delta",
            "budget",
            "remaining",
            "",
        ):
            table.add_column(col, justify="left" if col in ("client", "") else "right")
        for b in report.budgets:
            table.add_row(
                escape(b.client),
                str(b.releases),
                f"{b.epsilon:.4f}",
                f"{b.epsilon_rdp:.4f}",
                f"{b.epsilon_transcript:.4f}",
                f"{b.epsilon_fallback:.4f}" + (" (split)" if b.epsilon_fallback != b.epsilon else ""),
                f"{b.delta:g}",
                f"{b.budget:g}",
                f"{b.remaining:.4f}",
                "[red]EXCEEDED[/]" if b.exceeded else "[green]ok[/]",
            )
        console.print(table)
        console.print(
            "note: the budget holds epsilon by the PLD accountant (pessimistic discretisation); "
            "the RDP cross-check is looser and may read above the budget for a plan calibrated on "
            "PLD, which is not an overspend."
        )
    else:
        console.print(escape(f"No privacy ledgers: protocol {report.protocol!r} spends no DP budget."))
    summary: dict[tuple[str, str, str], list[Any]] = {}
    for d in report.disclosures:
        summary.setdefault((d.field, d.kind, d.protection), []).append(d)
    table = Table(title="What left the clients (from the transcript, checked against the spec and ledgers)")
    for col in ("field", "kind", "protection", "clients", "messages", "bytes", "uncovered events"):
        table.add_column(col, justify="right" if col in ("clients", "messages", "bytes") else "left")
    for (name, kind, protection), rows in sorted(summary.items()):
        style = "green" if protection in ("dp", "dp+encrypted", "public") else "red"
        uncovered = sorted({e for r in rows for e in r.uncovered_events})
        table.add_row(  # names and events come from the run's files: never markup
            escape(name),
            escape(kind),
            f"[{style}]{escape(protection)}[/]",
            str(len(rows)),
            str(sum(r.messages for r in rows)),
            escape(f"in {rows[0].packed_in}") if rows[0].packed_in else str(sum(r.bytes for r in rows)),
            escape(", ".join(uncovered[:3]) + (" ..." if len(uncovered) > 3 else "")),
        )
    console.print(table)
    if report.declaration != "registered":
        console.print(f"[yellow]note:[/] {escape(report.declaration)}")
    if report.signers != "none":
        where = "the registry given" if report.signers == "given" else "the run directory's signers.json"
        every = "" if report.signature_problems else "every signature verifies: "
        console.print(
            f"signatures: {every}{report.signed_messages} client messages and {report.signed_entries} "
            f"ledger entries verify against {where} (fingerprint {report.signers_fingerprint})"
        )
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if report.problems:
        console.print(f"[bold red]{len(report.problems)} problem(s):[/]")
        for p in report.problems[:20]:
            console.print(f"  - {escape(p)}")
        if len(report.problems) > 20:
            console.print(f"  ... and {len(report.problems) - 20} more (see --json)")
    else:
        console.print("[bold green]audit passed:[/] every field that left a client is declared and covered.")
