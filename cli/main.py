"""`securegmi` console script: the composition root and the only place with terminal I/O."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from securegmi.config import METHODS, SimulationConfig
from securegmi.errors import SecureGMIError

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
    protocol: Annotated[str, typer.Option(help="protocol of the federated methods: plain")] = "plain",
    top_b: Annotated[int | None, typer.Option(help="send only each client's B heaviest components")] = None,
    temperature: Annotated[
        float | None, typer.Option(help="initial likelihood temperature (default: by dataset)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of data split, initialisation and training")] = 0,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<method>-seed<seed>)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run directory")] = False,
    threads: Annotated[int, typer.Option(help="torch threads; 1 is fastest for these small models")] = 1,
    json_output: Annotated[bool, typer.Option("--json", help="print results.json instead of tables")] = False,
) -> None:
    """Run a full simulated federated study on an embedded dataset and write its run directory."""
    import torch

    from securegmi import protocols
    from securegmi.engine.run import RoundMetrics, run_simulation

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
        )
        if threads < 1:
            raise typer.BadParameter("--threads must be at least 1")
        builder = protocols.builder(protocol)
        torch.set_num_threads(threads)
        run_dir = out if out is not None else Path("runs") / f"{method}-seed{seed}"
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
                bar.update(
                    task,
                    advance=1,
                    status=(f"T={m.temperature:5.2f} acc={m.source_accuracy:.3f} pi-TV={m.pi_tv_error:.3f}"),
                )

            result = run_simulation(
                config,
                protocol=builder,
                out=run_dir,
                overwrite=overwrite,
                progress=on_round,
            )
    except SecureGMIError as exc:
        raise _fail(exc) from None
    results = result.to_dict()
    if json_output:
        console.print_json(json.dumps(results))
        return
    _print_clients(results)
    _print_summary(results, run_dir)


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
        (
            "privacy",
            "none: every uplink field is sent in the clear"
            if results["epsilon"] is None
            else str(results["epsilon"]),
        ),
        ("wall time", f"{results['wall_seconds']:.1f} s"),
        ("run directory", str(run_dir)),
    ):
        table.add_row(key, value)
    console.print(table)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by `securegmi simulate`")],
) -> None:
    """Write PNG plots of a run: true vs estimated pi per client; accuracy and pi error per round."""
    from securegmi.cli.plots import write_plots

    try:
        paths = write_plots(run_dir)
    except SecureGMIError as exc:
        raise _fail(exc) from None
    for path in paths:
        console.print(f"wrote {path}")


def main() -> None:
    app()
