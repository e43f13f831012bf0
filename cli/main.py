"""`securegmi` console script: the composition root and the only place with terminal I/O."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from securegmi.config import METHODS, SimulationConfig
from securegmi.engine.run import RunResult
from securegmi.errors import SecureGMIError
from securegmi.privacy.dpsgd import NOT_CSPRNG

app = typer.Typer(
    help="Privacy-enhanced federated learning for probabilistic mixtures (FedGMI).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _fail(exc: SecureGMIError) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(code=2)


@app.command()
def simulate(
    dataset: Annotated[
        str, typer.Option(help="digits (default), synthetic, or mnist5k (extra 'mnist')")
    ] = "digits",
    sources: Annotated[
        str, typer.Option(help="class-groups, or transforms (a sanity check only)")
    ] = "class-groups",
    n_sources: Annotated[int, typer.Option(help="number of inherent distributions in the data")] = 3,
    clients: Annotated[int, typer.Option(help="number of clients")] = 20,
    components: Annotated[int, typer.Option(help="number of mixture components K")] = 3,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration of each client's pi*")] = 0.5,
    rounds: Annotated[int, typer.Option(help="communication rounds")] = 60,
    local_epochs: Annotated[int, typer.Option(help="local epochs per round")] = 5,
    method: Annotated[str, typer.Option(help=f"one of {', '.join(METHODS)}")] = "fedgmi",
    protocol: Annotated[
        str | None, typer.Option(help="plain, dp or secure (default: secure with --epsilon, else plain)")
    ] = None,
    epsilon: Annotated[
        float | None, typer.Option(help="whole-run (epsilon, delta)-DP budget per client")
    ] = None,
    delta: Annotated[float, typer.Option(help="delta of the budget")] = 1e-5,
    noise_placement: Annotated[
        str | None,
        typer.Option(
            help="split (secure only: each client adds a share, only the CKKS sum is decrypted) "
            "or local (every upload carries the full noise); default split under secure"
        ),
    ] = None,
    min_clients: Annotated[
        int | None, typer.Option(help="smallest cohort a round may complete with (default: all clients)")
    ] = None,
    private_training: Annotated[
        str, typer.Option(help="statistics (DP statistics, then DP-SGD on the VAEs) or em (DP-SGD EM)")
    ] = "statistics",
    top_b: Annotated[int | None, typer.Option(help="send only each client's B heaviest components")] = None,
    temperature: Annotated[
        float | None, typer.Option(help="initial likelihood temperature (default: by dataset)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of data split, initialisation and training")] = 0,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<method>-seed<seed>)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run directory")] = False,
    threads: Annotated[int, typer.Option(help="torch threads; 1 is fastest for these small models")] = 1,
    engine: Annotated[
        str, typer.Option(help="inprocess, or flower: Flower's simulation engine (extra 'flower')")
    ] = "inprocess",
    json_output: Annotated[bool, typer.Option("--json", help="print results.json instead of tables")] = False,
) -> None:
    """Run a full simulated federated study on an embedded dataset and write its run directory."""
    import torch

    from securegmi import protocols

    try:
        config = SimulationConfig(
            dataset=dataset,
            sources=sources,
            n_sources=n_sources,
            clients=clients,
            components=components,
            alpha=alpha,
            rounds=rounds,
            local_epochs=local_epochs,
            method=method,
            top_b=top_b,
            temperature=temperature,
            seed=seed,
            protocol=protocol or ("secure" if epsilon is not None else "plain"),
            epsilon=epsilon,
            delta=delta,
            noise_placement=noise_placement,
            min_clients=min_clients,
            private_training=private_training,
        )
        if threads < 1:
            raise typer.BadParameter("--threads must be at least 1")
        builder = protocols.builder(config.protocol)
        torch.set_num_threads(threads)
        run_dir = out if out is not None else Path("runs") / f"{method}-seed{seed}"
        if engine == "flower":
            result = _simulate_on_flower(config, builder, run_dir, overwrite)
        elif engine != "inprocess":
            raise typer.BadParameter(f"--engine must be inprocess or flower, got {engine!r}")
        else:
            result = _simulate_in_process(config, builder, run_dir, overwrite, json_output)
    except SecureGMIError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        err_console.print(
            f"[yellow]interrupted:[/] the completed rounds are in {run_dir} (metrics.jsonl, transcript.jsonl"
            + (", ledgers/" if epsilon is not None else "")
            + "); results.json is written only by a finished run"
        )
        raise typer.Exit(code=130) from None
    results = result.to_dict()
    if json_output:
        console.print_json(json.dumps(results))
        return
    _print_clients(results)
    _print_summary(results, run_dir)


def _simulate_on_flower(config: SimulationConfig, builder: Any, run_dir: Path, overwrite: bool) -> RunResult:
    if config.method != "fedgmi":
        raise typer.BadParameter("--engine flower runs the fedgmi method only")
    try:
        from securegmi.adapters.flower import run_flower_simulation
    except ImportError:
        raise typer.BadParameter("--engine flower needs Flower: pip install 'securegmi[flower]'") from None
    status = f"fedgmi on Flower's simulation engine: {config.clients} SuperNodes, {config.rounds} rounds"
    with err_console.status(status):
        return run_flower_simulation(config, builder, run_dir, overwrite=overwrite)


def _simulate_in_process(
    config: SimulationConfig, builder: Any, run_dir: Path, overwrite: bool, json_output: bool
) -> RunResult:
    from securegmi.engine.run import RoundMetrics, run_simulation

    method, dataset, rounds = config.method, config.dataset, config.planned_rounds
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=json_output,
    ) as bar:
        task = bar.add_task(f"{method} on {dataset}", total=rounds, status="")

        def on_round(m: RoundMetrics) -> None:
            # Under the statistics design the first rows come after its statistics rounds.
            tempered = "" if config.statistics_design else f"T={m.temperature:5.2f} "
            bar.update(
                task,
                completed=m.round + 1,
                status=f"{tempered}acc={m.source_accuracy:.3f} pi-TV={m.pi_tv_error:.3f}",
            )

        def on_plan(plan: dict[str, Any]) -> None:
            bar.console.print(_plan_table(plan))
            bar.console.print(f"[yellow]note:[/] {NOT_CSPRNG}")

        return run_simulation(
            config,
            protocol=builder,
            out=run_dir,
            overwrite=overwrite,
            progress=on_round,
            on_plan=on_plan,
        )


def _plan_table(plan: dict[str, Any]) -> Table:
    table = Table(title="Privacy plan (per client, whole run)", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in _plan_rows(plan):
        table.add_row(key, value)
    return table


def _plan_rows(plan: dict[str, Any]) -> list[tuple[str, str]]:
    budget = ("budget", f"epsilon {plan['epsilon']:g}, delta {plan['delta']:g} (add/remove one record)")
    if plan.get("kind") == "statistics":
        s = plan["statistics"]
        share = (
            "each client adds 1/sqrt(min cohort) of it"
            if s["placement"] == "split"
            else "every client adds all of it"
        )
        return [
            budget,
            ("noise placement", f"{s['placement']}: {share}; minimum cohort {s['min_clients']}"),
            (
                "moments (round 0)",
                f"Gaussian, sensitivity sqrt(3), noise multiplier {s['moments_noise']:.3f}",
            ),
            (
                f"DP k-means (rounds 1-{s['iterations']})",
                f"{s['clusters']} fine clusters in {s['projection_dim']} dims, sensitivity sqrt(2), "
                f"noise multiplier {s['cluster_noise']:.3f}",
            ),
            (
                "histogram (round {})".format(s["iterations"] + 1),
                f"Gaussian, sensitivity 1, noise multiplier {s['histogram_noise']:.3f} (full noise, own row)",
            ),
            (
                "DP-SGD on the VAEs",
                f"{plan['vae_rounds']} rounds x {plan['steps_per_round']} steps, Poisson rate "
                f"{plan['sample_rate']:g}, clip {plan['clip_norm']:g}, noise multiplier "
                f"{plan['sgd_noise_multiplier']:.3f}",
            ),
            ("shares", f"statistics alone {plan['statistics_share']:.0%} of epsilon; DP-SGD the rest"),
        ]
    return [
        budget,
        (
            "rounds x DP-SGD steps",
            f"{plan['rounds']} x {plan['steps_per_round']} (Poisson rate {plan['sample_rate']:g})",
        ),
        ("DP-SGD", f"clip {plan['clip_norm']:g}, noise multiplier {plan['sgd_noise_multiplier']:.3f}"),
        (
            "soft counts",
            f"Gaussian, sensitivity 1, sigma {plan['count_noise_multiplier']:.3f} "
            f"({plan['count_share']:.0%} of epsilon alone)",
        ),
    ]


def _print_clients(results: dict[str, Any]) -> None:
    names = results["source_names"]
    table = Table(title="Per client (test split; components matched to sources)")
    table.add_column("client", justify="right")
    table.add_column("true pi (" + ", ".join(names) + ")")
    table.add_column("estimated pi")
    table.add_column("TV error", justify="right")
    table.add_column("source acc.", justify="right")
    for row in results["per_client"]:
        table.add_row(
            str(row["client"]),
            " ".join(f"{p:.2f}" for p in row["pi_true"]),
            " ".join(f"{p:.2f}" for p in row["pi_estimate"]),
            f"{row['pi_tv_error']:.3f}",
            f"{row['source_accuracy']:.3f}",
        )
    console.print(table)


def _print_summary(results: dict[str, Any], run_dir: Path) -> None:
    table = Table(title="Summary", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    nll = results["nll"]
    for key, value in (
        ("method / protocol", f"{results['method']} / {results['protocol'] or 'none (no messages)'}"),
        ("dataset", f"{results['dataset']} ({results['sources']}: {', '.join(results['source_names'])})"),
        (
            "clients x components x rounds",
            f"{results['clients']} x {results['components']} x {results['rounds']}",
        ),
        ("source accuracy", f"{results['source_accuracy']:.3f}"),
        ("mean pi TV error", f"{results['pi_tv_error']:.3f}"),
        ("held-out NLL bound (nats)", "n/a" if nll is None else f"{nll:.2f}"),
        ("uplink per client per round", f"{results['uplink_bytes_per_client_round'] / 1024:.1f} KiB"),
        ("privacy", _privacy_line(results["epsilon"])),
        ("wall time", f"{results['wall_seconds']:.1f} s"),
        ("run directory", str(run_dir)),
    ):
        table.add_row(key, value)
    console.print(table)


def _privacy_line(privacy: dict[str, Any] | None) -> str:
    if privacy is None:
        return "none: every uplink field is sent in the clear"
    line = (
        f"epsilon spent {privacy['max_spent']:.3f} (RDP; PLD {privacy['max_spent_pld']:.3f}) of "
        f"{privacy['target']:g}, delta {privacy['delta']:g}, per client; noise not from a CSPRNG"
    )
    if privacy.get("placement") == "split":
        line += (
            f"; split noise: against the server colluding with one client, epsilon "
            f"{privacy['max_spent_fallback']:.2f}"
        )
    return line


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `securegmi simulate`")],
) -> None:
    """Write PNG plots of a run: true vs estimated pi per client, accuracy and pi error per round,
    samples of each component (image data) and, for a private run, epsilon spent per round."""
    from securegmi.cli.plots import write_plots

    try:
        paths = write_plots(run_dir)
    except SecureGMIError as exc:
        raise _fail(exc) from None
    for path in paths:
        console.print(f"wrote {path}")


keys_app = typer.Typer(help="CKKS key ceremony for the secure protocol.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(
    out: Annotated[Path, typer.Option(help="directory for secret.ckks (mode 0600) and public.ckks")],
) -> None:
    """Create a study's CKKS keys: share secret.ckks with the clients out of band; give the
    server public.ckks only (it can add ciphertexts, never decrypt or encrypt)."""
    from securegmi.crypto.keys import SecretContext
    from securegmi.crypto.params import CkksParameters

    try:
        keys = SecretContext.generate(CkksParameters())
        secret_path, public_path = keys.save(out)
    except SecureGMIError as exc:
        raise _fail(exc) from None
    console.print(f"secret context (clients only, mode 0600): {secret_path}")
    console.print(f"public context (the server):             {public_path}")
    console.print(f"key id: {keys.key_id}")


@app.command()
def infer(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    data: Annotated[
        Path, typer.Option(help="records as rows: .npy, or .csv of numbers (a header row is skipped)")
    ],
    json_output: Annotated[bool, typer.Option("--json", help="print pi and counts as JSON")] = False,
    out: Annotated[
        Path | None, typer.Option(help="write per-record assignments and responsibilities (CSV)")
    ] = None,
) -> None:
    """Estimate the mixture proportions of a site's records and assign each to a component."""
    from securegmi.engine.trained import load

    try:
        model = load(run_dir)
        x = _read_records(data)
        pi = model.estimate_pi(x)
        r = model.responsibilities(x, pi)
    except SecureGMIError as exc:
        raise _fail(exc) from None
    assigned = r.argmax(1)
    counts = np.bincount(assigned, minlength=model.n_components)
    summary = {"records": len(x), "pi": pi.round(6).tolist(), "assigned_counts": counts.tolist()}
    if out is not None:
        header = "record,component," + ",".join(f"r{k}" for k in range(model.n_components))
        rows = np.column_stack([np.arange(len(x)), assigned, r])
        np.savetxt(
            out, rows, delimiter=",", header=header, comments="", fmt=["%d", "%d", *["%.6f"] * r.shape[1]]
        )
        summary["out"] = str(out)
    if json_output:
        console.print_json(json.dumps(summary))
        return
    table = Table(title=f"{len(x)} records from {data.name} (components of {run_dir})")
    for col in ("component", "estimated pi", "records assigned"):
        table.add_column(col, justify="right")
    for k in range(model.n_components):
        table.add_row(str(k), f"{pi[k]:.3f}", str(counts[k]))
    console.print(table)


def _read_records(path: Path) -> np.ndarray:
    from securegmi.errors import DataError

    if not path.exists():
        raise DataError(f"{path} does not exist")
    try:
        if path.suffix == ".npy":
            records: np.ndarray = np.load(path, allow_pickle=False)  # never unpickle a data file
            return records
        if path.suffix == ".csv":
            try:
                return np.loadtxt(path, delimiter=",", ndmin=2)
            except ValueError:
                return np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read records from {path}: {exc}") from exc
    raise DataError(f"{path}: records must be a .npy or .csv file")


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `securegmi simulate`")],
    json_output: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Report what left every client, its protection, and the privacy spent; exit 1 on any
    uncovered field or exceeded budget."""
    from securegmi import protocols
    from securegmi.engine.audit import audit_run

    try:
        report = audit_run(run_dir, protocols.builder)
    except SecureGMIError as exc:
        raise _fail(exc) from None
    if json_output:
        console.print_json(json.dumps(report.to_dict()))
    else:
        _print_audit(report)
    if not report.ok:
        raise typer.Exit(code=1)


def _print_audit(report: Any) -> None:
    if report.budgets:
        table = Table(title=f"Privacy spent per client (protocol {report.protocol})")
        for col in (
            "client",
            "releases",
            "epsilon (RDP)",
            "epsilon (PLD)",
            "server + 1 client",
            "delta",
            "budget",
            "remaining",
            "",
        ):
            table.add_column(col, justify="left" if col in ("client", "") else "right")
        for b in report.budgets:
            table.add_row(
                b.client,
                str(b.releases),
                f"{b.epsilon_rdp:.4f}",
                f"{b.epsilon_pld:.4f}",
                f"{b.epsilon_fallback:.4f}" + (" (split)" if b.epsilon_fallback != b.epsilon_rdp else ""),
                f"{b.delta:g}",
                f"{b.budget:g}",
                f"{b.remaining:.4f}",
                "[red]EXCEEDED[/]" if b.exceeded else "[green]ok[/]",
            )
        console.print(table)
    else:
        console.print(f"No privacy ledgers: protocol {report.protocol!r} spends no DP budget.")
    summary: dict[tuple[str, str, str], list[Any]] = {}
    for d in report.disclosures:
        summary.setdefault((d.field, d.kind, d.protection), []).append(d)
    table = Table(title="What left the clients (from the transcript, checked against the spec and ledgers)")
    for col in ("field", "kind", "protection", "clients", "messages", "bytes", "uncovered events"):
        table.add_column(col, justify="right" if col in ("clients", "messages", "bytes") else "left")
    for (name, kind, protection), rows in sorted(summary.items()):
        style = "green" if protection in ("dp", "dp+encrypted", "public") else "red"
        uncovered = sorted({e for r in rows for e in r.uncovered_events})
        table.add_row(
            name,
            kind,
            f"[{style}]{protection}[/]",
            str(len(rows)),
            str(sum(r.messages for r in rows)),
            str(sum(r.bytes for r in rows)),
            ", ".join(uncovered[:3]) + (" ..." if len(uncovered) > 3 else ""),
        )
    console.print(table)
    if report.problems:
        console.print(f"[bold red]{len(report.problems)} problem(s):[/]")
        for p in report.problems[:20]:
            console.print(f"  - {p}")
        if len(report.problems) > 20:
            console.print(f"  ... and {len(report.problems) - 20} more (see --json)")
    else:
        console.print("[bold green]audit passed:[/] every field that left a client is declared and covered.")


def main() -> None:
    app()
