"""The front door's names are pinned, as httpx's tests/test_exported_members.py pins its own:
every exported name exists, every public attribute is exported, `__all__` is sorted; and
`import securegmi` stays cheap (each name loads on first use)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types

import securegmi

# Dunder attributes that are part of the public surface.
PUBLIC_DUNDERS = {"__version__"}


def _public_attributes(module: types.ModuleType) -> list[str]:
    """Every public name the package binds once all its exports are loaded, less subpackages
    (importing `securegmi.core` binds `core` on the package: a module, not an export)."""
    for name in module.__all__:
        getattr(module, name)
    return sorted(
        (
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)
        ),
        key=str.casefold,
    )


def test_all_exports_exist_and_every_public_attribute_is_exported():
    assert all(hasattr(securegmi, name) for name in securegmi.__all__)
    assert sorted(securegmi.__all__, key=lambda n: (not n.isupper(), n[0].islower(), n)) == securegmi.__all__
    exported = sorted(securegmi.__all__, key=str.casefold)
    assert _public_attributes(securegmi) == exported
    assert set(vars(securegmi)) >= PUBLIC_DUNDERS


def test_the_export_check_catches_a_missing_and_an_unexported_name():
    """Negative controls: a module that exports a name it lacks, or binds one it does not export."""
    missing = types.ModuleType("missing")
    missing.__all__ = ["absent"]  # type: ignore[attr-defined]
    assert not all(hasattr(missing, name) for name in missing.__all__)  # type: ignore[attr-defined]
    extra = types.ModuleType("extra")
    extra.__all__ = ["kept"]  # type: ignore[attr-defined]
    extra.kept, extra.leaked = 1, 2  # type: ignore[attr-defined]
    assert _public_attributes(extra) != sorted(extra.__all__)  # type: ignore[attr-defined]


def test_an_unknown_name_is_an_attribute_error():
    try:
        securegmi.protocol_builder  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "protocol_builder" in str(exc)
    else:
        raise AssertionError("an unknown name resolved")
    # The subpackage securegmi.protocol is no longer shadowed by a function of that name.
    assert isinstance(importlib.import_module("securegmi.protocol"), types.ModuleType)
    assert isinstance(securegmi.protocol, types.ModuleType)


def test_importing_securegmi_and_its_cli_loads_no_torch():
    """`securegmi --help` answers at once: torch, Opacus and dp-accounting load only when a
    command needs them. Negative control: using a name that needs torch loads it."""
    probe = (
        "import sys, securegmi, securegmi.cli.main\n"
        "heavy = [m for m in ('torch', 'opacus', 'dp_accounting', 'tenseal') if m in sys.modules]\n"
        "print(heavy)\n"
        "securegmi.MixtureOfVAEs\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "True"]


def test_the_package_ships_its_type_hints():
    from importlib import resources

    assert resources.files("securegmi").joinpath("py.typed").is_file()
