"""Wall time of one study on each engine, side by side in one run: in-process, Flower's
simulation engine (the Ray it starts on loopback, then a running Ray cluster it joins: a head
node on 127.0.0.1 with 2 CPUs, its start timed apart), and Flower's deployment engine (a
SuperLink and one SuperNode per client as processes on 127.0.0.1, started with `flwr run`).
Beside each whole run, its rounds alone: in-process the time in `play_round` (broadcast, the
clients' replies, the additions; not the harness's per-round evaluation), on Flower the
ServerApp's time after every node has answered who it hosts (the nodes' start excluded).

    python bench/engines.py [--clients 3] [--rounds 5] [--protocol secure]

Writes bench/results/engines.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from securegmi.adapters.flower_study import run_flower_simulation
from securegmi.adapters.loopback import LoopbackDeployment, LoopbackRayHead
from securegmi.config import SimulationConfig
from securegmi.crypto.keys import PUBLIC_FILE, SecretContext
from securegmi.records.rundir import ENGINE
from securegmi.simulation import runner
from securegmi.simulation.runner import run_simulation
from securegmi.simulation.study import Federation

ROOT = Path(__file__).resolve().parents[1]


def deployment(config: SimulationConfig, work: Path) -> dict[str, float]:
    federation = Federation.build(config)
    nodes: list[dict[str, str | int]] = [
        {"partition-id": i, "state-dir": str(work / f"node-{i}")} for i in range(config.clients)
    ]
    overrides = {"study": json.dumps(config.to_dict()), "run-dir": str(work / "server")}
    if federation.secure:
        SecretContext.generate(federation.ckks_parameters()).save(work / "keys")
        (work / "server-keys").mkdir()
        shutil.copy(work / "keys" / PUBLIC_FILE, work / "server-keys" / PUBLIC_FILE)
        overrides["public-key"] = str(work / "server-keys" / PUBLIC_FILE)
        for node in nodes:
            node["key-dir"] = str(work / "keys")
    toml = work / "overrides.toml"
    toml.write_text("".join(f"{k} = '{v}'\n" for k, v in overrides.items()))
    started = time.perf_counter()
    with LoopbackDeployment(work / "flower", nodes) as d:
        ready = time.perf_counter()
        result = d.run(ROOT / "examples" / "flower_app", toml, timeout=3000)
        done = time.perf_counter()
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-2000:])
    return {
        "start_processes_s": ready - started,
        "flwr_run_s": done - ready,
        **server_app_parts(work / "server"),
        "total_s": done - started,
    }


def server_app_parts(run_dir: Path) -> dict[str, float | list[float]]:
    """Where the ServerApp's time went (its engine.json): until every node answered who it
    hosts (the ClientApps' start), and each exchange from sending to the last reply."""
    engine = json.loads((run_dir / ENGINE).read_text())
    exchanges = engine["exchange_seconds"]
    return {
        "server_app_s": engine["wall_seconds"],
        "connect_s": engine["connect_seconds"],
        "rounds_s": engine["wall_seconds"] - engine["connect_seconds"],
        "exchanges": len(exchanges),
        "exchanges_s": sum(exchanges),
        "exchange_s": exchanges,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--protocol", default="secure")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engines.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    epsilon = None if args.protocol == "plain" else 8.0
    # --rounds sets a plain run's length; a private one is the statistics design, of its own length.
    length = {"rounds": args.rounds} if epsilon is None else {}
    config = SimulationConfig(clients=args.clients, protocol=args.protocol, epsilon=epsilon, **length)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="sg-bench-") as tmp:
        work = Path(tmp)
        played: list[float] = []  # each in-process play_round, as the ServerApp plays them
        real_play_round = runner.play_round

        def timed_round(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return real_play_round(*args, **kwargs)
            finally:
                played.append(time.perf_counter() - t0)

        runner.play_round = timed_round  # type: ignore[assignment]
        started = time.perf_counter()
        try:
            local = run_simulation(config, out=work / "local")
        finally:
            runner.play_round = real_play_round  # type: ignore[assignment]
        rows["inprocess"] = {"total_s": time.perf_counter() - started, "rounds_s": sum(played)}
        started = time.perf_counter()
        flower = run_flower_simulation(config, work / "flower-sim")
        rows["flower-simulation"] = {
            "total_s": time.perf_counter() - started,
            **server_app_parts(work / "flower-sim"),
        }
        started = time.perf_counter()
        with LoopbackRayHead(work) as head:
            ready = time.perf_counter()
            run_flower_simulation(config, work / "flower-cluster", ray_address=head.address)
            rows["flower-simulation-cluster"] = {
                "start_ray_head_s": ready - started,
                "total_s": time.perf_counter() - ready,
                **server_app_parts(work / "flower-cluster"),
            }
        rows["flower-deployment"] = deployment(config, work / "deploy")
    base, rounds = rows["inprocess"]["total_s"], rows["inprocess"]["rounds_s"]
    for row in rows.values():
        row["ratio_to_inprocess"] = row["total_s"] / base
        # The same rounds once every process has started (the ServerApp's time after connecting).
        row["rounds_ratio_to_inprocess"] = row["rounds_s"] / rounds
    report = {
        "config": {"clients": args.clients, "rounds": config.planned_rounds, "protocol": args.protocol},
        "accuracy": {
            "inprocess": local.evaluation.source_accuracy,
            "flower-simulation": flower.evaluation.source_accuracy,
        },
        "engines": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'engine':<26} {'wall s':>8} {'x in-process':>13} {'rounds s':>9} {'x in-process':>13}")
    for name, row in rows.items():
        print(
            f"{name:<26} {row['total_s']:8.1f} {row['ratio_to_inprocess']:13.2f} {row['rounds_s']:9.1f}"
            f" {row['rounds_ratio_to_inprocess']:13.2f}"
        )
    for name in ("flower-simulation", "flower-simulation-cluster", "flower-deployment"):
        d = rows[name]
        print(
            f"{name}: ServerApp {d['server_app_s']:.1f} s, of which {d['connect_s']:.1f} s until every "
            f"node answered and {d['exchanges_s']:.1f} s in {d['exchanges']} exchanges (sending to the "
            f"last reply)"
        )


if __name__ == "__main__":
    main()
