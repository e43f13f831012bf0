"""`securegmi simulate`: a whole simulated study, with its plan, progress and summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from securegmi.config import METHODS, SimulationConfig
from securegmi.errors import ConfigError
from securegmi.vocabulary import Placement, PrivateDesign

if TYPE_CHECKING:
    from securegmi.simulation.runner import RunResult

from .app import app, console, err_console, errors_as_messages


@app.command()
@errors_as_messages
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
    rounds: Annotated[
        int, typer.Option(help="communication rounds (EM; the statistics design takes --vae-rounds)")
    ] = 60,
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
        Placement | None,
        typer.Option(
            help="split (secure only: each client adds a share, only the CKKS sum is decrypted) "
            "or local (every upload carries the full noise); default split under secure"
        ),
    ] = None,
    sgd_placement: Annotated[
        Placement | None,
        typer.Option(
            help="DP-SGD noise under the statistics design: split (secure only: one encrypted step per "
            "round, the sum carries the noise) or local (each client trains alone, full noise); "
            "default: the --noise-placement"
        ),
    ] = None,
    min_clients: Annotated[
        int | None, typer.Option(help="smallest cohort a round may complete with (default: all clients)")
    ] = None,
    private_training: Annotated[
        PrivateDesign,
        typer.Option(help="statistics (DP statistics, then DP-SGD on the VAEs) or em (DP-SGD EM)"),
    ] = PrivateDesign.STATISTICS,
    vae_rounds: Annotated[
        int, typer.Option(help="rounds of DP-SGD on the VAEs after the statistics (statistics design)")
    ] = 1,
    identifier_steps: Annotated[
        int | None,
        typer.Option(
            help="full-batch DP-SGD steps distilling a source classifier from the statistics (statistics "
            "design, split noise or central-dp; default 40 there; 0: none)"
        ),
    ] = None,
    top_b: Annotated[int | None, typer.Option(help="send only each client's B heaviest components")] = None,
    temperature: Annotated[
        float | None, typer.Option(help="initial likelihood temperature (default: by dataset)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of data split, initialisation and training")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(help="run directory (default runs/<method>-<protocol>[-eps<e>]-seed<seed>)"),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run directory")] = False,
    threads: Annotated[int, typer.Option(help="torch threads; 1 is fastest for these small models")] = 1,
    engine: Annotated[
        str, typer.Option(help="inprocess, or flower: Flower's simulation engine (extra 'flower')")
    ] = "inprocess",
    ray_address: Annotated[
        str | None,
        typer.Option(
            envvar="RAY_ADDRESS",
            help="with --engine flower: join this running Ray cluster (e.g. 127.0.0.1:6379 or auto) "
            "instead of starting a Ray on this machine",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print results.json instead of tables")] = False,
) -> None:
    """Run a full simulated federated study on an embedded dataset and write its run directory."""
    import torch

    from securegmi.simulation.runner import FEDERATED

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
        # A method that sends no message (central-dp) has no protocol to default to.
        protocol=protocol or ("secure" if epsilon is not None and method in FEDERATED else "plain"),
        epsilon=epsilon,
        delta=delta,
        noise_placement=noise_placement,
        min_clients=min_clients,
        sgd_placement=sgd_placement,
        private_training=private_training,
        vae_rounds=vae_rounds,
        identifier_steps=identifier_steps,
    )
    run_dir = out if out is not None else default_out(config)
    try:
        if threads < 1:
            raise ConfigError("--threads must be at least 1")
        torch.set_num_threads(threads)
        if engine == "flower":
            result = _simulate_on_flower(config, run_dir, overwrite, ray_address)
        elif engine != "inprocess":
            raise ConfigError(f"--engine must be inprocess or flower, got {engine!r}")
        elif ray_address is not None:
            raise ConfigError(
                "--ray-address (or RAY_ADDRESS) is for --engine flower; the in-process engine "
                "runs in this process only"
            )
        else:
            result = _simulate_in_process(config, run_dir, overwrite, json_output)
    except KeyboardInterrupt:
        _interrupted(run_dir)
    _report(result, run_dir, json_output)


@app.command()
@errors_as_messages
def resume(
    run_dir: Annotated[Path, typer.Argument(help="the directory of a stopped `securegmi simulate` run")],
    threads: Annotated[int, typer.Option(help="torch threads; 1 is fastest for these small models")] = 1,
    json_output: Annotated[bool, typer.Option("--json", help="print results.json instead of tables")] = False,
) -> None:
    """Continue a stopped (killed, interrupted) run to its planned end, with its configuration.

    Every client answers a round it had already answered with the identical bytes, and its
    ledger never charges a release twice."""
    import torch

    from securegmi.errors import RunDirectoryError
    from securegmi.files import JSON_FILE, read_json

    try:
        # A regular file within the cap (a FIFO would block, a link redirect); the run's own
        # record of its configuration is then checked against it (run_simulation, resume=True).
        config = SimulationConfig.from_dict(read_json(run_dir / "config.json", JSON_FILE))
    except (ValueError, RunDirectoryError) as exc:  # ConfigError is a ValueError
        raise RunDirectoryError(f"{run_dir}: no readable config.json of a securegmi run ({exc})") from None
    torch.set_num_threads(threads)
    try:
        result = _simulate_in_process(config, run_dir, False, json_output, True)
    except KeyboardInterrupt:
        _interrupted(run_dir)
    _report(result, run_dir, json_output)


def default_out(config: SimulationConfig) -> Path:
    """runs/<method>[-<protocol>][-eps<epsilon>]-seed<seed>: a private run and a plain one (or two
    budgets) never meet in one default directory."""
    from securegmi.simulation.runner import FEDERATED

    name = config.method + (f"-{config.protocol}" if config.method in FEDERATED else "")
    name += f"-eps{config.epsilon:g}" if config.epsilon is not None else ""
    return Path("runs") / f"{name}-seed{config.seed}"


def _interrupted(run_dir: Path) -> NoReturn:
    where = escape(str(run_dir))
    err_console.print(
        f"[yellow]interrupted:[/] the completed rounds are saved in {where}; continue with "
        f"`securegmi resume {where}` (results.json is written only by a finished run)"
    )
    raise typer.Exit(code=130) from None


def _report(result: RunResult, run_dir: Path, json_output: bool) -> None:
    results = result.to_dict()
    if json_output:
        console.print_json(json.dumps(results))
        return
    _print_clients(results)
    _print_summary(results, run_dir)


def _simulate_on_flower(
    config: SimulationConfig, run_dir: Path, overwrite: bool, ray_address: str | None
) -> RunResult:
    if config.method != "fedgmi":
        raise ConfigError("--engine flower runs the fedgmi method only")
    try:
        from securegmi.adapters.flower_study import run_flower_simulation
    except ImportError:
        raise ConfigError("--engine flower needs Flower: pip install 'securegmi[flower]'") from None
    where = f"the Ray cluster at {ray_address}" if ray_address else "this machine"
    status = (
        f"fedgmi on Flower's simulation engine ({where}): {config.clients} SuperNodes, "
        f"{config.planned_rounds} rounds"
    )
    with err_console.status(status):
        return run_flower_simulation(config, run_dir, overwrite=overwrite, ray_address=ray_address)


def _simulate_in_process(
    config: SimulationConfig,
    run_dir: Path,
    overwrite: bool,
    json_output: bool,
    resume: bool = False,
) -> RunResult:
    from securegmi.simulation.recorder import RoundMetrics
    from securegmi.simulation.runner import run_simulation

    method, dataset, rounds = config.method, config.dataset, config.planned_rounds
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=json_output,
    )
    task = bar.add_task(f"{method} on {dataset}", total=rounds, status="")

    def shown() -> Progress:
        # The bar appears with the plan or the first round, not before: a run refused while it is
        # set up (an impossible plan, a used --out) prints its one line of error and nothing else.
        if not bar.live.is_started:
            bar.start()
        return bar

    try:

        def on_round(m: RoundMetrics) -> None:
            # Under the statistics design the first rows come after its statistics rounds.
            tempered = "" if config.statistics_design else f"T={m.temperature:5.2f} "
            shown().update(
                task,
                completed=m.round + 1,
                status=f"{tempered}acc={m.source_accuracy:.3f} pi-TV={m.pi_tv_error:.3f}",
            )

        def on_plan(plan: dict[str, Any]) -> None:
            shown().console.print(_plan_table(plan))
            from securegmi.privacy.noise import NOISE_NOTE

            shown().console.print(f"[dim]note:[/] {NOISE_NOTE}")

        return run_simulation(
            config,
            out=run_dir,
            overwrite=overwrite,
            progress=on_round,
            on_plan=on_plan,
            resume=resume,
        )
    finally:
        if bar.live.is_started:
            bar.stop()


def _plan_table(plan: dict[str, Any]) -> Table:
    table = Table(title="Privacy plan (per client, whole run)", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in _plan_rows(plan):
        table.add_row(key, value)
    return table


def _plan_rows(plan: dict[str, Any]) -> list[tuple[str, str]]:
    budget = ("budget", f"epsilon {plan['epsilon']:g}, delta {plan['delta']:g} (add/remove one record)")
    if plan.get("kind") == PrivateDesign.STATISTICS:
        s = plan["statistics"]
        share = (
            "each client adds sigma/sqrt(min cohort - 1) of it"
            if s["placement"] == Placement.SPLIT
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
            *(
                [
                    (
                        "source classifier",
                        f"{plan['identifier_steps']} full-batch DP-SGD steps on the statistics' "
                        f"responsibilities, {plan['identifier_hidden']} hidden units, clip "
                        f"{plan['clip_norm']:g}, noise multiplier {plan['identifier_noise_multiplier']:.3f}, "
                        "split as DP-SGD's below",
                    )
                ]
                if plan.get("identifier_steps")
                else []
            ),
            (
                "DP-SGD on the VAEs",
                f"{plan['vae_rounds']} x {plan['steps_per_round']} steps, {_batches(plan['sample_rate'])}, "
                f"clip {plan['clip_norm']:g}, noise multiplier "
                f"{plan['sgd_noise_multiplier']:.3f}; "
                + (
                    "split: one step per round, each client adds sigma/sqrt(min cohort - 1) of the noise"
                    if plan.get("sgd_placement") == Placement.SPLIT
                    else "local: each client steps alone, with all of the noise"
                ),
            ),
            ("shares", _shares(plan)),
        ]
    return [
        budget,
        (
            "rounds x DP-SGD steps",
            f"{plan['rounds']} x {plan['steps_per_round']} ({_batches(plan['sample_rate'])})",
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
        ("run directory", escape(str(run_dir))),
    ):
        table.add_row(key, value)
    console.print(table)


def _privacy_line(privacy: dict[str, Any] | None) -> str:
    if privacy is None:
        return "none: every uplink field is sent in the clear"
    line = (
        f"epsilon spent {privacy['max_spent']:.3f} of {privacy['target']:g} (PLD accountant; RDP "
        f"cross-check {privacy['max_spent_rdp']:.3f}, looser), delta {privacy['delta']:g}, per client; "
        + (
            "noise from ChaCha20 keyed with OS entropy"
            if privacy.get("secure_rng")
            else "SEEDED test noise: anyone holding config.json can subtract it"
        )
    )
    if privacy.get("placement") == Placement.SPLIT:
        line += (
            f"; split noise: against the server colluding with one client, epsilon "
            f"{privacy['max_spent_fallback']:.2f}"
        )
    return line


def _batches(sample_rate: float) -> str:
    """How DP-SGD's batches are drawn, in words."""
    return "full batch (every record, every step)" if sample_rate == 1 else f"Poisson rate {sample_rate:g}"


def _shares(plan: dict[str, Any]) -> str:
    share = plan["statistics_share"]
    if not plan.get("identifier_steps"):
        return f"statistics alone {share:.0%} of epsilon; DP-SGD the rest"
    alone = share * (1 - plan["identifier_share"])
    return f"statistics alone {alone:.0%} of epsilon, with the classifier {share:.0%}; the VAEs the rest"
