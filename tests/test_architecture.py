"""The layering of docs/design.md §4: imports point downward only, and the install layout is right."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

from .no_pickle import pickling_in_source

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "securegmi"

# For each library package, the securegmi packages and third-party libraries it must not import.
UPPER = ("securegmi.federation", "securegmi.records", "securegmi.simulation", "securegmi.adapters")
FORBIDDEN = {
    "core": {"securegmi.data", "securegmi.protocol", "securegmi.privacy", "securegmi.crypto", *UPPER}
    | {"opacus", "tenseal", "flwr", "typer"},
    "data": {"securegmi.protocol", "securegmi.privacy", "securegmi.crypto", *UPPER}
    | {"opacus", "tenseal", "flwr", "typer"},
    "protocol": {*UPPER, "torch", "typer"},
    "crypto": {"securegmi.privacy", "securegmi.protocol", *UPPER, "torch", "opacus", "flwr", "typer"},
    "privacy": {"securegmi.crypto", "securegmi.protocol", *UPPER, "tenseal", "flwr", "typer"},
    # What a deployment runs knows nothing of the harness, of run directories, or of Flower.
    "federation": {"securegmi.data", "securegmi.records", "securegmi.simulation", "securegmi.adapters"}
    | {"securegmi.config", "flwr", "typer"},
    "records": {"securegmi.federation", "securegmi.simulation", "securegmi.adapters", "flwr", "typer"},
    "simulation": {"securegmi.adapters", "flwr", "typer"},
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from securegmi import protocols` imports securegmi.protocols.
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _violations(package: str) -> list[str]:
    bad = []
    for path in (LIB / package).rglob("*.py"):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_downward(package):
    assert _violations(package) == []


@pytest.mark.parametrize("module", ["files.py", "vocabulary.py"])
def test_safe_files_and_the_vocabulary_sit_at_the_bottom_beside_errors(module):
    """securegmi.files is read through, and securegmi.vocabulary's names are used, by privacy,
    protocol, crypto and federation, so each may import nothing of securegmi but the exception
    tree (and no torch, tenseal, flwr or typer)."""
    names = _imports(LIB / module)
    ours = [n for n in names if n.split(".")[0] == "securegmi"]
    assert ours and all(n == "securegmi.errors" or n.startswith("securegmi.errors.") for n in ours)
    assert not {n.split(".")[0] for n in names} & {"torch", "tenseal", "flwr", "typer", "opacus"}


def _reaches_protocols_or_cli(path: Path) -> list[str]:
    return [
        name
        for name in _imports(path)
        if name.startswith(("securegmi.protocols", "securegmi.cli", "protocols", "cli"))
    ]


def test_library_never_imports_protocols_or_cli(tmp_path):
    """The library finds protocols by name (securegmi.protocol.registry, entry points): so the
    source tree type-checks without the installed layout, where only securegmi.protocols exists."""
    assert [(str(p), n) for p in LIB.rglob("*.py") for n in _reaches_protocols_or_cli(p)] == []
    # Negative control: the front door's old import is caught.
    bad = tmp_path / "front_door.py"
    bad.write_text("from securegmi import protocols\n")
    assert _reaches_protocols_or_cli(bad) == ["securegmi.protocols"]


@pytest.mark.parametrize("folder", ["protocols", "cli"])
def test_protocols_and_cli_import_within_themselves_relatively(folder):
    """`mypy securegmi protocols cli` runs on the source tree, where protocols/ and cli/ are
    top-level packages: an absolute securegmi.protocols or securegmi.cli import would not resolve."""
    assert [(p.name, n) for p in (ROOT / folder).rglob("*.py") for n in _reaches_protocols_or_cli(p)] == []


def test_layering_check_catches_an_upward_import(tmp_path, monkeypatch):
    # Negative control: a core module importing the engine is reported.
    fake = tmp_path / "securegmi" / "core"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from securegmi.simulation.runner import run_simulation\n")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "LIB", tmp_path / "securegmi")
    monkeypatch.setattr(this, "ROOT", tmp_path)
    assert sorted(_violations("core")) == [
        "securegmi/core/bad.py imports securegmi.simulation.runner",
        "securegmi/core/bad.py imports securegmi.simulation.runner.run_simulation",
    ]


def test_protocols_and_cli_install_inside_the_securegmi_namespace():
    assert importlib.import_module("securegmi.protocols").__name__ == "securegmi.protocols"
    assert importlib.import_module("securegmi.cli.main").app is not None
    spec = importlib.util.find_spec("cli")
    assert spec is None or Path(spec.origin or "").parent == ROOT / "cli"  # only via the source tree


def _flwr_importers() -> list[str]:
    return sorted(
        str(path.relative_to(ROOT))
        for folder in ("securegmi", "cli", "protocols")
        for path in (ROOT / folder).rglob("*.py")
        if any(name == "flwr" or name.startswith("flwr.") for name in _imports(path))
    )


def test_only_the_flower_adapter_imports_flwr():
    assert _flwr_importers() == ["securegmi/adapters/flower.py"]


def test_flwr_import_check_catches_a_second_importer(tmp_path, monkeypatch):
    # Negative control: an engine module that imports flwr is reported beside the adapter.
    for folder in ("securegmi/adapters", "securegmi/federation", "cli", "protocols"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "securegmi/adapters/flower.py").write_text("import flwr\n")
    (tmp_path / "securegmi/federation/bad.py").write_text("from flwr.app import Message\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _flwr_importers() == ["securegmi/adapters/flower.py", "securegmi/federation/bad.py"]


def test_no_module_pickles():
    """No pickle-based serialiser is imported or called anywhere a user's code or data runs
    through: the package, its CLI and protocols, the benches and the examples."""
    assert pickling_in_source(ROOT, ("securegmi", "cli", "protocols", "bench", "examples")) == []


def test_the_pickle_check_catches_each_way_in(tmp_path):
    # Negative control: one planted module per way a pickle could enter.
    (tmp_path / "securegmi").mkdir()
    planted = {
        "a.py": "import pickle\n",
        "b.py": "from dill import dumps\n",
        "c.py": "import torch\ntorch.save({}, 'x')\n",
        "d.py": "import numpy as np\nnp.load('x', allow_pickle=True)\n",
        "e.py": "import joblib.numpy_pickle\n",
    }
    for name, text in planted.items():
        (tmp_path / "securegmi" / name).write_text(text)
    found = pickling_in_source(tmp_path, ("securegmi",))
    assert [f.split(":")[0] for f in found] == [f"securegmi/{n}" for n in planted]
