"""No pickle anywhere: in the code (no module imports a pickle-based serialiser or calls one) and
in what a run writes (every file parses in a data-only format chosen by its name)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from safetensors import safe_open

PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
# Calls that unpickle or pickle under the hood (torch.load/save, numpy with allow_pickle).
PICKLING_CALLS = {"torch.load", "torch.save", "np.save", "numpy.save", "pd.read_pickle", "to_pickle"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def pickling_in_source(root: Path, folders: tuple[str, ...]) -> list[str]:
    """`file:line what` for every pickle import, pickling call or allow_pickle=True."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.Import):
                    names = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [(node.module or "").split(".")[0]]
                elif isinstance(node, ast.Call):
                    name = _dotted(node.func)
                    if name in PICKLING_CALLS or name.rsplit(".", 1)[-1] in PICKLING_CALLS:
                        found.append(f"{where} calls {name}")
                    for keyword in node.keywords:
                        value = keyword.value
                        if keyword.arg == "allow_pickle" and not (
                            isinstance(value, ast.Constant) and value.value is False
                        ):
                            found.append(f"{where} passes allow_pickle")
                    continue
                else:
                    continue
                found += [f"{where} imports {n}" for n in names if n in PICKLING_MODULES]
    return found


def _json_lines(path: Path) -> None:
    for line in path.read_text().splitlines():
        json.loads(line)


def _safetensors(path: Path) -> None:
    with safe_open(str(path), "np") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            f.get_tensor(key)


def _png(path: Path) -> None:
    if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")


def _ckks(path: Path) -> None:
    """A TenSEAL context (protobuf): `securegmi keys new` and a simulated run's client keys."""
    import tenseal as ts

    ts.context_from(path.read_bytes())


def _ed25519(path: Path) -> None:
    """A client's Ed25519 signing key: 32 bytes as hex text (crypto.signing)."""
    if len(bytes.fromhex(path.read_text().strip())) != 32:
        raise ValueError("not a 32-byte key in hex")


DATA_ONLY = {
    ".ckks": _ckks,
    ".ed25519": _ed25519,
    ".json": lambda p: json.loads(p.read_text()),
    ".jsonl": _json_lines,
    ".safetensors": _safetensors,
    ".png": _png,
}


def non_data_files(run_dir: Path) -> list[str]:
    """Every file of `run_dir` that does not parse in the data-only format its suffix names (or
    has a suffix with no such format), with the reason."""
    bad = []
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        reader = DATA_ONLY.get(path.suffix)
        try:
            if reader is None:
                raise ValueError(f"no data-only format for {path.suffix!r}")
            reader(path)
        except Exception as exc:
            bad.append(f"{path.relative_to(run_dir)}: {exc}")
    return bad
