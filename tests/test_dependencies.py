"""Every third-party import of the package is declared: a `[project] dependencies` entry, or an
optional extra imported only lazily, behind an error that names the extra.

A fresh `pip install -e .` (no extras) must be able to import and run every module that is not
part of an extra; a development environment with extras installed hides a missing declaration
(typer 0.29 stopped pulling click, and `cli/app.py` imported click: issue 24)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"securegmi": "securegmi", "protocols": "securegmi.protocols", "cli": "securegmi.cli"}

# Import names whose distribution is named otherwise; any other name is its own distribution.
IMPORT_TO_DIST = {
    "sklearn": "scikit-learn",
    "dp_accounting": "dp-accounting",
    "flwr": "flwr",
    "mlxtend": "mlxtend",
    "PIL": "pillow",
    "yaml": "pyyaml",
    "google": "protobuf",
}

# Modules that exist for one extra: they may import it at module level, and every other module
# imports them only lazily, behind an error naming the extra.
EXTRA_MODULES = {
    "securegmi.adapters.flower": "flower",
    "securegmi.adapters.flower_study": "flower",
}


def normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[([^\]]*)\])?", requirement)
    assert match, requirement
    return match.group(0).strip()


def declared(pyproject: Mapping[str, Any]) -> tuple[set[str], dict[str, set[str]]]:
    """(distributions of `[project] dependencies`, {extra: distributions it adds}); an extra that
    names the package itself (`securegmi[flower]`) adds that extra's distributions."""
    project = pyproject["project"]
    own = normalise(project["name"])
    core = {normalise(_requirement_name(r).split("[")[0]) for r in project["dependencies"]}
    raw = project.get("optional-dependencies", {})

    def expand(extra: str, seen: frozenset[str]) -> set[str]:
        dists: set[str] = set()
        for requirement in raw[extra]:
            name, _, inner = _requirement_name(requirement).partition("[")
            if normalise(name) == own:
                for sub in inner.rstrip("]").split(","):
                    if sub.strip() and sub.strip() not in seen:
                        dists |= expand(sub.strip(), seen | {sub.strip()})
            else:
                dists.add(normalise(name))
        return dists

    return core, {extra: expand(extra, frozenset({extra})) for extra in raw}


def module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    base = FOLDERS[parts[0]]
    rest = [p for p in parts[1:] if p != "__init__"]
    return ".".join([base, *rest])


def _imported(node: ast.AST, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            package = module.split(".")[: len(module.split(".")) - node.level]
            base = ".".join([*package, node.module] if node.module else package)
        else:
            base = node.module or ""
        # `from securegmi.adapters import flower` imports securegmi.adapters.flower.
        return [base, *(f"{base}.{a.name}" for a in node.names if base.startswith("securegmi"))]
    if (
        isinstance(node, ast.Call)
        and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return [node.args[0].value]
    return []


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(k, ast.Name) and k.id in ("ImportError", "ModuleNotFoundError") for k in kinds)


def _names_extra(handler: ast.ExceptHandler, extra: str) -> bool:
    """The handler raises an error whose message names `securegmi[<extra>]`."""
    for raise_ in (n for n in ast.walk(handler) if isinstance(n, ast.Raise) and n.exc is not None):
        for text in (n for n in ast.walk(raise_.exc) if isinstance(n, ast.Constant)):
            if isinstance(text.value, str) and f"[{extra}]" in text.value:
                return True
    return False


def _walk(node: ast.AST, stack: tuple[ast.AST, ...] = ()) -> Iterator[tuple[ast.AST, tuple[ast.AST, ...]]]:
    """Every node with its ancestors; a try's handlers are not under its guard, so they are
    walked with the try left off the stack."""
    yield node, stack
    for field, value in ast.iter_fields(node):
        children = value if isinstance(value, list) else [value]
        inner = stack if isinstance(node, ast.Try) and field != "body" else (*stack, node)
        for child in children:
            if isinstance(child, ast.AST):
                yield from _walk(child, inner)


def _lazy_and_guarded(stack: tuple[ast.AST, ...], extra: str) -> bool:
    in_function = any(isinstance(a, ast.FunctionDef | ast.AsyncFunctionDef) for a in stack)
    guarded = any(
        isinstance(a, ast.Try)
        and any(_catches_import_error(h) and _names_extra(h, extra) for h in a.handlers)
        for a in stack
    )
    return in_function and guarded


def undeclared_imports(
    sources: Mapping[str, str],
    pyproject: Mapping[str, Any],
    import_to_dist: Mapping[str, str] = IMPORT_TO_DIST,
    extra_modules: Mapping[str, str] = EXTRA_MODULES,
) -> list[str]:
    """`module:line why` for every import, in `sources` ({module name: source text}), of a
    third-party package that a plain install may lack."""
    core, extras = declared(pyproject)
    of_extra: dict[str, set[str]] = {}
    for extra, dists in extras.items():
        for dist in dists - core:
            of_extra.setdefault(dist, set()).add(extra)
    problems = []
    for module, text in sources.items():
        own_extra = extra_modules.get(module)
        for node, stack in _walk(ast.parse(text, module)):
            for name in _imported(node, module):
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "__future__" or not name:
                    continue
                where = f"{module}:{getattr(node, 'lineno', 0)}"
                if top == "securegmi":
                    extra = extra_modules.get(name)
                    if extra is None:
                        continue
                    names_of = {extra}
                    what = f"{name} (extra {extra!r})"
                else:
                    dist = normalise(import_to_dist.get(top, top))
                    if dist in core:
                        continue
                    if dist not in of_extra:
                        problems.append(
                            f"{where} imports {name}: distribution {dist!r} is neither a dependency "
                            "nor in an extra"
                        )
                        continue
                    names_of = of_extra[dist]
                    what = f"{name} (distribution {dist!r}, extra {' or '.join(sorted(names_of))})"
                if own_extra in names_of or any(_lazy_and_guarded(stack, e) for e in names_of):
                    continue
                problems.append(
                    f"{where} imports {what} outside a function, or not behind `except ImportError` "
                    "raising an error that names the extra (securegmi[...])"
                )
    return problems


def package_sources(root: Path = ROOT) -> dict[str, str]:
    return {
        module_name(path.relative_to(root)): path.read_text(encoding="utf-8")
        for folder in FOLDERS
        for path in sorted((root / folder).rglob("*.py"))
    }


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_import_is_declared():
    sources = package_sources()
    assert "securegmi.cli.app" in sources and "securegmi.protocols.secure" in sources
    assert undeclared_imports(sources, pyproject()) == []


def test_the_extra_modules_exist():
    # A renamed module would leave its entry here guarding nothing.
    assert set(EXTRA_MODULES) <= set(package_sources())


GUARDED = """
def run():
    try:
        from securegmi.adapters.flower_study import run_flower_simulation
        import flwr
    except ImportError:
        raise ConfigError("needs Flower: pip install 'securegmi[flower]'") from None
"""


def test_the_checker_catches_each_way_an_undeclared_import_gets_in():
    # Negative controls: one planted module per way, each reported; then the forms that are fine.
    planted = {
        "securegmi.cli.a": "import click\n",  # what issue 24 found
        "securegmi.core.b": "def f():\n    import requests\n",  # lazy does not declare it
        "securegmi.federation.c": "import flwr\n",  # an extra at module level
        "securegmi.core.d": "def f():\n    import flwr\n",  # lazy but unguarded
        "securegmi.core.e": "def f():\n    try:\n        import flwr\n    except ImportError:\n"
        "        pass\n",  # guarded, but the error is swallowed
        "securegmi.core.f": "def f():\n    try:\n        import flwr\n    except ImportError:\n"
        "        raise ValueError('no flower')\n",  # guarded, but the error does not name the extra
        "securegmi.cli.g": "from securegmi.adapters import flower\n",  # an extra's module, eagerly
        "securegmi.cli.h": "try:\n    import flwr\nexcept ImportError:\n"
        "    raise ValueError('securegmi[flower]')\n",  # guarded at module level: not lazy
        "securegmi.cli.i": "import importlib\nimportlib.import_module('requests')\n",
        "securegmi.cli.j": "def f():\n    try:\n        pass\n    except ImportError:\n"
        "        import flwr\n        raise ValueError('securegmi[flower]')\n",  # in the handler
    }
    found = undeclared_imports(planted, pyproject())
    assert sorted({f.split(":")[0] for f in found}) == sorted(planted), found
    assert any("'click' is neither a dependency nor in an extra" in f for f in found)
    fine = {
        "securegmi.cli.ok": GUARDED,
        "securegmi.adapters.flower": "import flwr\nfrom flwr.app import Message\n",
        "securegmi.adapters.flower_study": "from securegmi.adapters.flower import run\n",
        "securegmi.core.ok": "import numpy as np\nfrom sklearn.decomposition import NMF\nimport os, json\n",
        "securegmi.cli.rel": "from .app import app\nfrom securegmi.config import X\n",
    }
    assert undeclared_imports(fine, pyproject()) == []


def test_the_checker_reads_the_declarations_from_pyproject():
    # Negative control: drop scikit-learn from the dependencies and its import is reported.
    project = pyproject()
    core, extras = declared(project)
    assert {"scikit-learn", "dp-accounting", "typer", "opacus"} <= core and "click" not in core
    assert "flwr" in extras["flower"] and "flwr" in extras["dev"]  # dev names securegmi[flower]
    without = {**project, "project": dict(project["project"])}
    without["project"]["dependencies"] = [
        r for r in project["project"]["dependencies"] if not r.startswith("scikit-learn")
    ]
    source = {"securegmi.core.x": "from sklearn.cluster import KMeans\n"}
    assert undeclared_imports(source, project) == []
    assert len(undeclared_imports(source, without)) == 1


def test_import_names_map_to_the_installed_distributions():
    """The map agrees with what is installed, for every import name the package uses."""
    assert _mismatches(IMPORT_TO_DIST) == []
    # Negative control: a wrong entry is reported.
    assert _mismatches({**IMPORT_TO_DIST, "sklearn": "sklearn"}) == ["sklearn"]


def _mismatches(import_to_dist: Mapping[str, str]) -> list[str]:
    installed = importlib.metadata.packages_distributions()
    names = {
        name.split(".")[0]
        for module, text in package_sources().items()
        for node, _ in _walk(ast.parse(text, module))
        for name in _imported(node, module)
    }
    return sorted(
        name
        for name in names
        if name in installed
        and normalise(import_to_dist.get(name, name)) not in {normalise(d) for d in installed[name]}
        and name not in sys.stdlib_module_names
        and name != "securegmi"
    )
