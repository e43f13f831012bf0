"""Protocols are found by name through the `securegmi.protocols` entry-point group: the
built-ins, and a protocol a third-party package registers (here a package put on sys.path
with its own `*.dist-info/entry_points.txt`, as pip would install it, without pip)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from securegmi.cli.main import app
from securegmi.errors import ConfigError
from securegmi.federation.server import play_round
from securegmi.federation.transport import InProcessTransport
from securegmi.protocol import FieldKind, ProtocolSpec, registry
from securegmi.protocols import plain
from securegmi.records.audit import audit_run
from securegmi.simulation.runner import run_simulation
from securegmi.simulation.study import Federation
from tests.configs import small_config

SMALL = {"rounds": 2, "hidden": 8}  # beside tests.configs.SMALL

PLUGIN = '''
from dataclasses import replace

from securegmi.protocols import plain


def build(*, components, parameters, top_b=None):
    # A third party's protocol: the plain round under its own name and description.
    spec = plain.build(components=components, parameters=parameters, top_b=top_b)
    return replace(spec, name="acme", description="Acme's FedGMI round in the clear.")


def misnamed(**dims):
    return replace(build(**dims), name="plain")


def not_a_spec(**dims):
    return {"name": "notaspec"}


CONSTANT = 3
'''

ENTRY_POINTS = """
[securegmi.protocols]
acme = acme_protocols:build
broken = acme_protocols.missing:build
misnamed = acme_protocols:misnamed
notaspec = acme_protocols:not_a_spec
constant = acme_protocols:CONSTANT
"""


def _install(site: Path) -> Path:
    """The files `pip install acme-protocols` would leave in a site directory."""
    (site / "acme_protocols").mkdir(parents=True)
    (site / "acme_protocols" / "__init__.py").write_text(PLUGIN)
    info = site / "acme_protocols-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-protocols\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS))
    return site


@pytest.fixture
def acme(tmp_path, monkeypatch):
    site = _install(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("acme_protocols", None)


def test_the_built_in_protocols_are_registered():
    assert registry.available() == ("dp", "plain", "secure")
    assert registry.builder("plain") is plain.build
    assert registry.bind("plain", components=3, parameters=5) == plain.build(components=3, parameters=5)


def test_a_third_party_protocol_is_found_by_name_and_runs_a_round(acme):
    assert {"acme", "dp", "plain", "secure"} <= set(registry.available())
    config = small_config(**SMALL, protocol="acme")
    federation = Federation.build(config)
    assert federation.spec.name == "acme" and federation.spec.description.startswith("Acme's")
    clients = {cid: federation.client(i, None) for i, cid in enumerate(federation.client_ids)}
    server = federation.server(None)
    transport = InProcessTransport.linking(server, clients.values())
    outcome = play_round(server, transport, list(clients), 0, 1.0)
    assert sorted(outcome.replies) == sorted(clients) and not outcome.refused and not outcome.rejected


def test_without_the_plugin_installed_its_protocol_is_unknown():
    # Negative control of the test above: the name is found only through the entry point.
    assert "acme" not in registry.available()
    with pytest.raises(ConfigError, match=r"unknown protocol 'acme'; registered protocols: dp, plain, sec"):
        Federation.build(small_config(**SMALL, protocol="acme"))


def test_an_unknown_name_says_how_a_protocol_is_registered():
    with pytest.raises(ConfigError, match=r"entry point in group 'securegmi.protocols'") as caught:
        registry.builder("nosuch")
    assert "'nosuch'" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        (
            "broken",
            r"protocol 'broken' \(entry point 'acme_protocols.missing:build'.*fails to load "
            r"\(ModuleNotFoundError",
        ),
        ("constant", r"names a int, not a builder"),
        ("notaspec", r"returned a dict, not a ProtocolSpec"),
        ("misnamed", r"builds a protocol named 'plain'; the name it is registered under"),
    ],
)
def test_a_plugin_that_is_not_a_protocol_is_a_config_error(acme, name, match):
    with pytest.raises(ConfigError, match=match):
        registry.bind(name, components=2, parameters=4)


def test_a_builder_that_takes_other_arguments_is_a_config_error(acme):
    # The plugin's build takes no statistics=: the private statistics design cannot bind it.
    with pytest.raises(ConfigError, match="cannot be bound to these dimensions"):
        registry.bind("acme", components=2, parameters=4, statistics={"M": 1, "S": 1, "H": 1, "N": 1})


def test_rebind_is_bind_at_a_specs_recorded_dimensions():
    spec = plain.build(components=3, parameters=5, top_b=2)
    assert registry.rebind("plain", spec.dims) == spec
    with pytest.raises(ConfigError, match="lack 'P'"):
        registry.rebind("plain", {"K": 3, "B": 3})


def test_the_json_form_of_a_spec_reads_back_equal_and_refuses_anything_else():
    spec = plain.build(components=3, parameters=5)
    assert ProtocolSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    wrong = spec.to_json()
    wrong["stages"][1]["fields"][0]["kind"] = "secret"
    with pytest.raises(ConfigError, match="unknown kind 'secret'"):
        ProtocolSpec.from_json(wrong)
    with pytest.raises(ConfigError, match="unexpected"):
        ProtocolSpec.from_json({**spec.to_json(), "code": "import os"})
    # A rewrite that breaks the declaration's own invariants is refused as on construction.
    for stage in wrong["stages"]:
        for f in stage["fields"]:
            f["kind"] = FieldKind.DP_RELEASE.value
    with pytest.raises(ConfigError, match="release 'none' disagrees"):
        ProtocolSpec.from_json(wrong)


def test_the_audit_of_an_unregistered_protocol_checks_the_recorded_declaration(acme, tmp_path):
    """A run under a plugin's protocol is audited against the registry while the plugin is
    installed; without it, against the declaration protocol.json recorded, which the report
    says, with the same findings. Negative control: that recorded declaration is still checked
    (a field it declares otherwise than the transcript shows is a problem)."""
    out = tmp_path / "run"
    run_simulation(small_config(**SMALL, protocol="acme"), out=out)
    registered = audit_run(out)
    assert registered.declaration == "registered" and registered.protocol == "acme"
    assert registered.problems  # a protocol in the clear: every uplink field is unprotected
    sys.path.remove(str(acme))
    assert "acme" not in registry.available()
    recorded = audit_run(out, trust_recorded_protocol=True)
    assert recorded.declaration.startswith("recorded only: protocol 'acme' is not registered here")
    assert (recorded.problems, recorded.disclosures) == (registered.problems, registered.disclosures)
    # Untrusted, the recorded declaration is itself a problem: it could call every field public.
    untrusted = audit_run(out)
    assert untrusted.problems[0].startswith("protocol 'acme' is not registered here")
    assert untrusted.problems[1:] == registered.problems
    shown = CliRunner().invoke(app, ["audit", str(out), "--trust-recorded-protocol"])
    assert shown.exit_code == 1 and "note: recorded only: protocol 'acme' is not registered" in shown.output
    declared = json.loads((out / "protocol.json").read_text())
    for stage in declared["stages"]:
        for f in stage["fields"]:
            if f["name"] == "masses":
                f["kind"] = FieldKind.PUBLIC.value
    (out / "protocol.json").write_text(json.dumps(declared))
    assert "client-0 sent 'masses' as non-private, which protocol 'acme' does not declare" in (
        audit_run(out, trust_recorded_protocol=True).problems
    )


def _claim(site: Path, entry_points: str) -> Path:
    """A package whose entry points claim names other packages register."""
    (site / "rogue").mkdir(parents=True)
    (site / "rogue" / "__init__.py").write_text("def build(**dims):\n    raise SystemExit('rogue')\n")
    info = site / "rogue-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rogue\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[securegmi.protocols]\n{entry_points}\n")
    return site


def test_a_package_claiming_a_built_in_name_is_refused_not_loaded(tmp_path, monkeypatch):
    """A *.dist-info in the working directory (`python -c` puts it first on sys.path) that
    registers `plain` would decide what the audit checks a plain run against, and run its own
    code: the name is refused and nothing of it is imported. Negative control: securegmi's own
    entry point alone binds."""
    assert registry.builder("plain") is plain.build
    monkeypatch.syspath_prepend(str(_claim(tmp_path / "site", "plain = rogue:build")))
    with pytest.raises(ConfigError, match=r"protocol 'plain' is claimed by 'rogue:build', 'securegmi"):
        registry.builder("plain")
    assert "rogue" not in sys.modules
    assert registry.builder("secure") is not None  # the other names are not claimed


def test_a_third_party_name_two_packages_claim_is_refused(acme, tmp_path, monkeypatch):
    assert registry.builder("acme") is not None  # negative control: one claim
    monkeypatch.syspath_prepend(str(_claim(tmp_path / "other", "acme = rogue:build")))
    with pytest.raises(ConfigError, match=r"protocol 'acme' is claimed by 'acme_protocols:build', 'rogue"):
        registry.builder("acme")
    assert "rogue" not in sys.modules
