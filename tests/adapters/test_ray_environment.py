"""Joining a Ray cluster: the address is checked before Ray sees it, and a loopback head is
reached on loopback (the run itself on a Ray head: tests/adapters/test_flower.py)."""

from __future__ import annotations

import os
import socket
import sys
import types

import pytest

pytest.importorskip("flwr")

from securegmi.adapters.flower import ray_environment
from securegmi.errors import ConfigError

RAY_CONSTANTS = "ray._private.ray_constants"


@pytest.fixture
def listening():
    """A TCP port on 127.0.0.1 that accepts connections, standing in for a Ray head's GCS."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield f"127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture(autouse=True)
def _environment(monkeypatch):
    for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_TMPDIR", "FLWR_HOME"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("address", ["head-node", "127.0.0.1:port", ":6379", "ray://127.0.0.1"])
def test_an_address_that_is_not_host_and_port_is_refused(tmp_path, address):
    with pytest.raises(ConfigError, match="host:port or 'auto'"):
        ray_environment(tmp_path, address)


def test_an_address_where_nothing_listens_is_refused_at_once(tmp_path, listening):
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(ConfigError, match="no Ray cluster answers"):
        ray_environment(tmp_path, closed)
    ray_environment(tmp_path, listening)  # control: the same check passes where one listens
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_a_loopback_head_is_refused_when_ray_was_imported_off_loopback(tmp_path, listening, monkeypatch):
    """Ray decides at import whether it rewrites 127.0.0.1 to this host's network address."""
    monkeypatch.setitem(sys.modules, RAY_CONSTANTS, types.SimpleNamespace(ENABLE_RAY_CLUSTER=True))
    with pytest.raises(ConfigError, match="RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"):
        ray_environment(tmp_path, listening)
    monkeypatch.setitem(sys.modules, RAY_CONSTANTS, types.SimpleNamespace(ENABLE_RAY_CLUSTER=False))
    ray_environment(tmp_path, listening)  # control: imported on loopback, fine


def test_a_head_elsewhere_leaves_ray_networking_to_the_cluster(tmp_path, monkeypatch):
    connected = []
    monkeypatch.setattr(
        socket, "create_connection", lambda address, timeout: connected.append(address) or socket.socket()
    )
    ray_environment(tmp_path, "10.1.2.3:6379")
    assert connected == [("10.1.2.3", 6379)]
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0" and (tmp_path / "flwr").is_dir()
