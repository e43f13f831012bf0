"""A Flower deployment on one machine: a SuperLink and SuperNodes as processes on 127.0.0.1;
and a Ray cluster's head node on 127.0.0.1 for the simulation engine to join.

For trying either before going across machines, and for the tests and benches. It runs
Flower's own command-line programs (no flwr import here) with what keeps every process and
byte on loopback: each API bound to 127.0.0.1, no runtime dependency installation (`flwr run`
would otherwise install the app's dependencies, a multi-GB torch build among them), telemetry
and update checks off, and Flower's files under `home`. Every process is started in its own
session and stopped with its whole group (SuperNodes leave SuperExec children otherwise).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from securegmi.errors import RunAbortedError
from securegmi.files import write_atomic

# Keep Flower from phoning home, and Ray on 127.0.0.1 (it binds the host's address otherwise,
# even when told 127.0.0.1; set before Ray is imported).
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
SAFETY_ENV = {**QUIET_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
CONNECTION = "loopback"  # the SuperLink connection name written to FLWR_HOME/config.toml
HOST = "127.0.0.1"


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


@dataclass(frozen=True)
class _Process:
    pid: int
    state: str
    ppid: int
    pgrp: int


def _processes() -> list[_Process]:
    """Every process on this machine, from /proc (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name may hold spaces and parentheses: fields start after the last ")".
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            found.append(_Process(int(stat.parent.name), state, int(ppid), int(pgrp)))
        except (OSError, ValueError):
            continue
    return found


def group_members(pgid: int) -> list[int]:
    """The running processes of a process group (zombies do not count)."""
    return [p.pid for p in _processes() if p.pgrp == pgid and p.state != "Z"]


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for p in _processes():
        children.setdefault(p.ppid, []).append(p.pid)
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(children.get(current, []))
    return found


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    if len(host) == 8:  # IPv4, little-endian
        ip = ".".join(str(int(host[i : i + 2], 16)) for i in (6, 4, 2, 0))
    else:  # IPv6, four little-endian words
        words = [host[i : i + 8] for i in range(0, 32, 8)]
        raw = b"".join(bytes.fromhex(w)[::-1] for w in words)
        ip = socket.inet_ntop(socket.AF_INET6, raw)
    return f"{ip}:{int(port, 16)}"


def listening_addresses(pids: Iterable[int]) -> list[str]:
    """host:port of every TCP socket the given processes listen on (Linux /proc)."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    found.append(_address(cols[1]))
    return sorted(found)


def off_loopback(addresses: list[str]) -> list[str]:
    return [a for a in addresses if not a.startswith(("127.", "::1:", "::ffff:127."))]


def stop_groups(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each process's group, SIGKILL to what is left after 10 s; returns when no
    process of any group is left (or 10 s after the SIGKILL)."""
    for process in processes:
        _signal_group(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
    while any(group_alive(p.pid) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    for process in processes:
        _signal_group(process.pid, signal.SIGKILL)  # what outlived its leader
        process.wait()
    deadline = time.monotonic() + 10
    while any(group_alive(p.pid) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _toml_value(value: str | int) -> str:
    return str(value) if isinstance(value, int) else '"' + str(value).replace('"', '\\"') + '"'


@dataclass
class LoopbackDeployment:
    """`with LoopbackDeployment(home, nodes) as d: d.run(app_dir, overrides)`.

    `nodes` holds one node config per SuperNode (e.g. partition-id, state-dir, key-dir)."""

    home: Path
    nodes: list[Mapping[str, str | int]]
    start_timeout: float = 60.0
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = Path(self.home)
        self.logs = self.home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        flwr_home = self.home / "flwr"
        flwr_home.mkdir(exist_ok=True)
        self.env = {
            **os.environ,
            **SAFETY_ENV,
            "FLWR_HOME": str(flwr_home),
            # Flower's programs (and the ones they start) from this interpreter's environment.
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        }
        self.port = free_port()
        config = (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{HOST}:{self.port}"\ninsecure = true\n'
        )
        write_atomic(flwr_home / "config.toml", config.encode("utf-8"))

    def __enter__(self) -> LoopbackDeployment:
        try:
            self._spawn(
                "superlink",
                [
                    "flower-superlink",
                    "--insecure",
                    "--disable-runtime-dependency-installation",
                    "--host",
                    HOST,
                    "--port",
                    str(self.port),
                ],
            )
            self._wait_for_port(self.port, "superlink")
            for i, node in enumerate(self.nodes):
                config = " ".join(f"{key}={_toml_value(value)}" for key, value in node.items())
                node_port = free_port()
                self._spawn(
                    f"supernode-{i}",
                    [
                        "flower-supernode",
                        "--insecure",
                        "--superlink",
                        f"{HOST}:{self.port}",
                        "--host",
                        HOST,
                        "--port",
                        str(node_port),
                        "--node-config",
                        config,
                    ],
                )
                self._wait_for_port(node_port, f"supernode-{i}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def run(self, app_dir: Path, run_config: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        """`flwr run APP loopback --run-config FILE --stream`: returns when the run has ended."""
        command = ["flwr", "run", str(app_dir), CONNECTION, "--run-config", str(run_config), "--stream"]
        command[0] = shutil.which("flwr", path=self.env["PATH"]) or "flwr"
        return subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def _spawn(self, name: str, command: list[str]) -> None:
        command = [shutil.which(command[0], path=self.env["PATH"]) or command[0], *command[1:]]
        log = (self.logs / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _wait_for_port(self, port: int, name: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise RunAbortedError(f"{name} exited at start; see {self.logs / name}.log")
            with socket.socket() as s:
                if s.connect_ex((HOST, port)) == 0:
                    return
            time.sleep(0.2)
        raise RunAbortedError(f"{name} did not listen on {HOST}:{port} within {self.start_timeout:g} s")

    def stop(self) -> None:
        """Stop every process group this deployment started, by its leader's PID, and wait
        until no process of any group is left (SIGKILL after 10 s)."""
        stop_groups(list(self.processes.values()))
        self.processes.clear()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values()]


class LoopbackRayHead:
    """`with LoopbackRayHead(logs) as head: ... ray_address=head.address`: a Ray cluster's head
    node on 127.0.0.1, as `ray start --head` starts one, with `cpus` CPUs, in its own session
    and stopped with its group by PID (`ray stop` would stop every Ray of this user)."""

    def __init__(self, logs: Path, cpus: int = 2, start_timeout: float = 120.0) -> None:
        self.log = Path(logs) / "ray-head.log"
        self.cpus, self.start_timeout = cpus, start_timeout
        self.address = f"{HOST}:{free_port()}"
        self.members: set[int] = set()

    def __enter__(self) -> LoopbackRayHead:
        # Ray's Unix sockets live about 70 characters below its temp dir: keep its path short.
        self.temp = Path(tempfile.mkdtemp(prefix="sg-ray-"))
        command = [
            str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
            f"--node-ip-address={HOST}", f"--port={self.address.rsplit(':', 1)[1]}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            "--include-dashboard=false", "--disable-usage-stats", f"--num-cpus={self.cpus}",
            f"--temp-dir={self.temp}",
        ]  # fmt: skip
        env = {**os.environ, **SAFETY_ENV, "RAY_USAGE_STATS_ENABLED": "0"}
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout
        while "Ray runtime started" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RunAbortedError(f"the Ray head did not start; see {self.log}")
            time.sleep(0.5)
        self.members = set(group_members(self.process.pid))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the head's whole group (`stop_groups`); raises if a process outlived SIGKILL."""
        stop_groups([self.process])
        shutil.rmtree(self.temp, ignore_errors=True)
        if group_alive(self.process.pid):
            raise RunAbortedError(f"processes of the Ray head's group {self.process.pid} outlived SIGKILL")
