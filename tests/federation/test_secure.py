"""The secure protocol: DP as in `dp`, plus CKKS; the server holds no secret key."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from securegmi.cli.main import app
from securegmi.config import SimulationConfig
from securegmi.crypto.keys import SecretContext
from securegmi.crypto.params import CkksParameters
from securegmi.federation.server import Server
from securegmi.protocol import Message
from securegmi.protocol.fields import Ciphertext
from securegmi.protocols import secure
from securegmi.simulation.runner import run_simulation
from securegmi.simulation.study import load_federated_data, new_model
from tests.configs import private_config

from ..no_pickle import non_data_files
from ..secret_walk import secret_holders, secret_serialisations

CLIENTS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """dp and secure with the same (seeded, test-only) noise, and a secure run as deployed."""
    base = tmp_path_factory.mktemp("secure")
    out = {}
    for name, protocol, noise, placement, sgd in (
        ("dp", "dp", "seeded", "local", None),
        ("secure", "secure", "seeded", "local", None),  # the same noise as dp
        ("secure-private", "secure", "private", None, None),  # split statistics and DP-SGD, the default
        ("secure-local-sgd", "secure", "private", None, "local"),  # clients upload weighted components
    ):
        config = private_config(
            protocol, clients=CLIENTS, dp_noise=noise, noise_placement=placement, sgd_placement=sgd
        )
        out[name] = (base / name, run_simulation(config, out=base / name))
    return out


@pytest.mark.slow
def test_secure_and_dp_report_the_same_epsilon_and_utility(runs):
    (_, d), (_, s) = runs["dp"], runs["secure"]
    assert s.privacy == d.privacy  # the same plan, ledgers and spend
    assert abs(s.evaluation.source_accuracy - d.evaluation.source_accuracy) <= 0.02
    assert abs(s.evaluation.pi_tv_error - d.evaluation.pi_tv_error) <= 0.01
    assert s.uplink_bytes_per_client_round > d.uplink_bytes_per_client_round  # ciphertexts are larger


@pytest.mark.slow
def test_a_secure_run_passes_the_audit_and_encryption_alone_would_not(runs, tmp_path):
    out, _ = runs["secure-private"]
    runner = CliRunner()
    report = json.loads(runner.invoke(app, ["audit", str(out), "--json"]).stdout)
    assert report["ok"] and {d["protection"] for d in report["disclosures"]} == {"dp+encrypted"}
    # Negative control: a ciphertext whose plaintext is not on a ledger fails the audit.
    import shutil

    shutil.copytree(out, tmp_path / "t")
    transcript = tmp_path / "t" / "transcript.jsonl"
    rows = [json.loads(line) for line in transcript.read_text().splitlines()]
    for r in rows:
        if r.get("field") == "gradient" and r["sender"] == "client-2":
            r.pop("event", None)
    transcript.write_text("".join(json.dumps(r) + "\n" for r in rows))
    audit = runner.invoke(app, ["audit", str(tmp_path / "t"), "--json"])
    assert audit.exit_code == 1
    assert "encrypted only" in {d["protection"] for d in json.loads(audit.stdout)["disclosures"]}


def test_the_masses_leave_inside_the_components_ciphertexts_and_the_audit_checks_it(runs, tmp_path):
    out, _ = runs["secure-local-sgd"]
    rows = [json.loads(line) for line in (out / "transcript.jsonl").read_text().splitlines()]
    masses = [r for r in rows if r.get("field") == "masses" and r["sender"] != "server"]
    assert masses and all(
        r["packed_in"] == "weighted_components" and r["bytes"] == 0 and r["event"] for r in masses
    )
    runner = CliRunner()
    report = json.loads(runner.invoke(app, ["audit", str(out), "--json"]).stdout)
    packed = {d["packed_in"] for d in report["disclosures"] if d["field"] == "masses"}
    assert report["ok"] and packed == {"weighted_components"}
    # Negative control: a transcript claiming the masses left in an envelope of their own.
    import shutil

    shutil.copytree(out, tmp_path / "t")
    for r in masses:
        r.pop("packed_in")  # edits `rows` in place
    (tmp_path / "t" / "transcript.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    audit = json.loads(runner.invoke(app, ["audit", str(tmp_path / "t"), "--json"]).stdout)
    assert not audit["ok"]
    assert any("'masses' packed in ['None'], protocol 'secure' declares" in p for p in audit["problems"])


def _first_update(protocol: str, keys: SecretContext | None) -> Message:
    """Client 0's round-0 update under `protocol`, with seeded (test-only) noise."""
    from securegmi.simulation.study import Federation

    config = private_config(
        protocol, clients=CLIENTS, dp_noise="seeded", noise_placement="local", private_training="em", rounds=3
    )
    federation = Federation.build(config)
    server = federation.server(keys.public() if keys is not None else None)
    return federation.client(0, keys).handle(server.broadcast(0, 1.0))


def test_packing_changes_where_the_releases_travel_not_what_they_are():
    """The secure update, decrypted, is the dp update: the same released masses and components
    (the same seeded noise), the masses after the components in one envelope."""
    from securegmi.crypto.envelope import decrypt

    keys = SecretContext.generate(CkksParameters(max_clients=CLIENTS))
    clear, sealed = _first_update("dp", None), _first_update("secure", keys)
    masses = sealed.payload["masses"]
    assert isinstance(masses, Ciphertext) and masses.data == b"" and masses.event is not None
    assert masses.event == clear.payload["masses"].event  # type: ignore[union-attr]
    envelope = sealed.payload["weighted_components"]
    assert isinstance(envelope, Ciphertext)
    opened = decrypt(keys, envelope.data)
    components = clear.payload["weighted_components"].value.ravel()  # type: ignore[union-attr]
    expected = np.concatenate([components, clear.payload["masses"].value])  # type: ignore[union-attr]
    assert opened.shape == expected.shape
    np.testing.assert_allclose(opened, expected, atol=1e-6)
    # Negative control: the masses placed before the components would not match.
    swapped = np.concatenate([clear.payload["masses"].value, components])  # type: ignore[union-attr]
    assert not np.allclose(opened, swapped, atol=1e-6)


def _server(keys: SecretContext) -> Server:
    config = private_config("secure", clients=CLIENTS)
    ref = new_model(config, load_federated_data(config))
    spec = secure.build(components=3, parameters=ref.parameter_count())
    return Server(spec, keys.public())


class _Slotted:
    __slots__ = ("held",)

    def __init__(self, held: object) -> None:
        self.held = held


class _Holder:
    def __init__(self, held: object) -> None:
        self.held = held

    def method(self) -> None:
        pass


def _plants(keys: SecretContext, secret: bytes) -> dict[str, object]:
    """One way each for a secret to hide in a server object."""
    held = keys

    def closure() -> object:
        return held

    return {
        "attribute": keys,
        "dict value": {"k": keys},
        "dict key": {keys: 1},
        "list": [0, keys],
        "tuple": (keys,),
        "set": {keys},
        "slots": _Slotted(keys),
        "closure": closure,
        "default argument": lambda k=keys: k,
        "bound method": _Holder(keys).method,
        "partial": functools.partial(print, keys),
        "nested object": _Holder(_Holder(keys)),
        "tenseal context": keys.context,
        "seal decryptor": keys.decryptor,
        "seal symmetric encryptor": keys.encryptor,
        "serialised secret key": b"header" + secret,
    }


def test_no_secret_is_reachable_from_the_server_and_the_walk_finds_each_hiding_place(monkeypatch):
    keys = SecretContext.generate(CkksParameters(max_clients=4))
    secrets = secret_serialisations(keys)
    server = _server(keys)
    server.broadcast(0, 1.0)
    assert secret_holders(server, secrets) == []
    # Negative controls: the walk finds a secret planted in each kind of place...
    for kind, plant in _plants(keys, secrets[1]).items():
        server.__dict__["planted"] = plant
        assert secret_holders(server, secrets), kind
        del server.__dict__["planted"]
    # ...and behind a property of a securegmi class.
    monkeypatch.setattr(Server, "leaky", property(lambda self: keys), raising=False)
    assert secret_holders(server, secrets) == ["root.leaky: SecretContext"]


def test_an_update_under_another_key_is_rejected_and_the_round_completes():
    from securegmi.crypto.envelope import decrypt, encrypt

    keys = SecretContext.generate(CkksParameters(max_clients=4))
    server = _server(keys)
    p = server.spec.dims["P"]

    def update(k: SecretContext, sender: str, scale: float) -> Message:
        return Message(
            "update",
            0,
            sender,
            {
                # The masses travel after the components, in one envelope.
                "masses": Ciphertext(b"", k.key_id, "counts@round0", "weighted_components"),
                "weighted_components": Ciphertext(
                    encrypt(k, np.full(3 * p + 3, scale)), k.key_id, "dpsgd@round0"
                ),
            },
            run=server.run_id,
        )

    stranger = SecretContext.generate(CkksParameters(max_clients=4))
    server.broadcast(0, 1.0)
    rejected = server.aggregate(
        {"a": update(keys, "a", 1.0), "b": update(stranger, "b", 5.0), "c": update(keys, "c", 2.0)}
    )
    assert list(rejected) == ["b"] and "another key" in rejected["b"]
    masses, sums = server.totals["component_masses"], server.totals["component_sums"]
    assert masses == b"" and isinstance(sums, bytes)  # the masses' sums are in the sums' envelope
    total = decrypt(keys, sums)
    assert total.shape == (3 * p + 3,) and np.allclose(total, 3.0, atol=1e-5)


def test_keys_new_writes_an_owner_only_secret(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["keys", "new", "--out", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    assert os.stat(tmp_path / "k" / "secret.ckks").st_mode & 0o777 == 0o600
    again = runner.invoke(app, ["keys", "new", "--out", str(tmp_path / "k")])
    assert again.exit_code == 2 and "refusing to overwrite" in again.output


def test_secure_refuses_top_b():
    from securegmi.errors import ConfigError

    with pytest.raises(ConfigError, match="top-b"):
        SimulationConfig(protocol="secure", epsilon=8.0, top_b=1)


@pytest.mark.slow
def test_the_exported_model_of_a_secure_run_is_rounded(runs):
    from safetensors.numpy import load_file

    out, _ = runs["secure"]
    step = CkksParameters(max_clients=CLIENTS).release_grid()  # as the study builds them
    components = load_file(str(out / "model.safetensors"))["components"].astype(np.float64)
    assert np.allclose(components, np.round(components / step) * step, rtol=0, atol=1e-7)
    # Negative control: the dp run's export is not on the grid.
    d_out, _ = runs["dp"]
    d = load_file(str(d_out / "model.safetensors"))["components"].astype(np.float64)
    assert not np.allclose(d, np.round(d / step) * step, rtol=0, atol=1e-9)


@pytest.mark.slow
def test_the_audit_fails_a_run_whose_noise_was_seeded(runs):
    out, _ = runs["secure"]  # dp_noise="seeded"
    audit = CliRunner().invoke(app, ["audit", str(out), "--json"])
    assert audit.exit_code == 1
    assert any("regenerate and subtract" in p for p in json.loads(audit.stdout)["problems"])


def _audit(run_dir, *, signatures: bool = False) -> tuple[int, list[str]]:  # type: ignore[no-untyped-def]
    """Exit code and problems; without `signatures`, those of every check but the signatures'
    (listed last), which tests/records/test_signatures.py tests."""
    audit = CliRunner().invoke(app, ["audit", str(run_dir), "--json"])
    assert audit.exit_code in (0, 1), audit.output
    report = json.loads(audit.stdout)
    problems = list(report["problems"])
    return audit.exit_code, problems if signatures else problems[
        : len(problems) - report["signature_problems"]
    ]


@pytest.mark.slow
def test_a_seeded_run_relabelled_private_still_fails_the_audit(runs, tmp_path):
    """Each ledger's first link holds where its noise came from: changing "dp_noise": "seeded"
    to "private" in config.json leaves every ledger saying seeded."""
    import shutil

    out, _ = runs["secure"]  # seeded
    shutil.copytree(out, tmp_path / "t")
    config_file = tmp_path / "t" / "config.json"
    config = json.loads(config_file.read_text())
    assert config["dp_noise"] == "seeded"
    config_file.write_text(json.dumps(config | {"dp_noise": "private"}))
    code, problems = _audit(tmp_path / "t")
    assert code == 1 and problems == [
        f"client-{i}: its ledger records seeded DP noise (derived from the run seed, for tests only: it can "
        "be regenerated and subtracted), config.json says dp_noise 'private': no DP guarantee holds for "
        "its releases"
        for i in range(CLIENTS)
    ] + _SEEDED_STATES + [_SEEDED_RESULTS]
    # Negative control: a private run's ledgers say private, and it passes.
    private, _ = runs["secure-private"]
    assert _audit(private) == (0, [])
    ledger = json.loads((private / "ledgers" / "client-0.json").read_text())
    assert ledger["noise"] == "private"


# What the records a seeded run wrote beside its ledgers say once config.json claims private noise.
_SEEDED_STATES = [
    f"client-{i}: client-states/client-{i}.safetensors holds the state of seeded DP noise (only seeded, "
    "test-only noise is ever saved), the run claims private noise: no DP guarantee holds for its releases"
    for i in range(CLIENTS)
]
_SEEDED_RESULTS = (
    "results.json says the DP noise was 'seeded' (secure_rng False), config.json says dp_noise 'private': "
    "the configuration does not say where this run's noise came from"
)


@pytest.mark.slow
def test_a_seeded_run_relabelled_private_with_its_ledgers_rewritten_fails_the_audit(runs, tmp_path):
    """config.json relabelled private and every ledger re-saved as private through the library
    (its chain is an unkeyed hash, so it is recomputed): the ledgers and the configuration agree.
    results.json still says where the noise came from, and each client's state holds the state of
    its seeded noise, which is never saved for private noise."""
    import shutil

    from safetensors import safe_open

    from securegmi.privacy.ledger import PrivacyLedger

    out, _ = runs["secure"]  # seeded
    run = tmp_path / "t"
    shutil.copytree(out, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"dp_noise": "private"}))
    for path in sorted((run / "ledgers").glob("*.json")):
        ledger = PrivacyLedger.load(path)
        assert ledger.noise_source == "seeded"
        dataclasses.replace(ledger, noise_source="private", signatures=()).save(path)
    assert _audit(run) == (1, [*_SEEDED_STATES, _SEEDED_RESULTS])
    # Re-saved without the clients' keys, every ledger is unsigned too.
    signed = _audit(run, signatures=True)[1][len(_SEEDED_STATES) + 1 :]
    assert [p.split(":")[0] for p in signed] == [p.stem for p in sorted((run / "ledgers").glob("*.json"))]
    assert all("no signature" in p for p in signed), signed
    # Each record alone fails it.
    (run / "results.json").rename(run / "results.moved")
    assert _audit(run) == (1, _SEEDED_STATES)
    (run / "results.moved").rename(run / "results.json")
    shutil.rmtree(run / "client-states")
    assert _audit(run) == (1, [_SEEDED_RESULTS])
    # Negative control: a private run's states hold no noise state, and it passes.
    private, _ = runs["secure-private"]
    assert _audit(private) == (0, [])
    for state in sorted((private / "client-states").glob("*.safetensors")):
        with safe_open(str(state), framework="numpy") as fh:
            assert "noise" not in (fh.metadata() or {}) and "ledger" in (fh.metadata() or {})


@pytest.fixture(scope="module")
def split_in_the_clear(tmp_path_factory):
    """A secure configuration (split noise) run under the clear `dp` protocol: every split
    share travels unencrypted, with a fraction of the noise. No public path builds it (the
    federation binds the protocol the configuration names, and a client refuses a clear
    protocol for split noise: test_cohort), so the registry's lookup is redirected and the
    client's check switched off here to show that the audit catches such a directory too (one
    written by older code, say)."""
    from securegmi.federation import client as client_module
    from securegmi.protocol import registry

    bind = registry.bind

    out = tmp_path_factory.mktemp("secure") / "split-clear"
    # DP-SGD local: the split stages of DP-SGD have no counterpart in `dp` to be redirected to.
    config = private_config("secure", clients=CLIENTS, vae_rounds=1, sgd_placement="local")
    assert config.placement == "split"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "bind", lambda name, **dims: bind("dp", **dims))
        patch.setattr(client_module, "_check_split_stages", lambda spec, plan: None)
        run_simulation(config, out=out)
    return out


def _split_in_the_clear(where: str) -> str:
    return (
        f"{where} split the noise across clients, protocol 'dp' (protocol.json) has codec 'clear': each "
        "split share (sigma / sqrt(min_clients - 1)) reached the server unencrypted, with less than "
        "the planned noise"
    )


@pytest.mark.slow
def test_split_noise_sent_in_the_clear_fails_the_audit(runs, split_in_the_clear, tmp_path):
    """Split noise is sound only inside a CKKS sum. The split run under `secure` passes (the
    control); the same configuration recorded under `dp` fails: its configuration names another
    protocol, and its plan splits the noise of releases that travelled in the clear. With
    config.json relabelled `dp` too, its placement is not the plan's, and the plan still splits."""
    import shutil

    assert _audit(runs["secure-private"][0]) == (0, [])
    rows = [json.loads(line) for line in (split_in_the_clear / "transcript.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows if r["sender"] != "server"} == {"dp-release"}  # nothing encrypted
    assert _audit(split_in_the_clear) == (
        1,
        [
            "config.json gives protocol 'secure', protocol.json names 'dp': the transcript was recorded "
            "under another protocol than the configuration's",
            _split_in_the_clear("config.json noise_placement, dp_plan.json placement"),
        ],
    )
    shutil.copytree(split_in_the_clear, tmp_path / "t")
    config_file = tmp_path / "t" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"protocol": "dp"}))
    assert _audit(tmp_path / "t") == (
        1,
        [
            "config.json gives noise_placement 'local', dp_plan.json (or protocol.json) 'split': the plan is "
            "not this run's",
            _split_in_the_clear("dp_plan.json placement"),
        ],
    )


@pytest.mark.slow
def test_a_split_round_summed_from_fewer_than_the_minimum_cohort_fails_the_audit(runs, tmp_path):
    """Split noise is sized so that the plan's minimum cohort carries it all: the audit counts
    the uploads each split round's sum added. Three of four clients' k-means uploads turned into
    refusals (each client's ledger still charges them, so nothing else disagrees), or simply
    removed from the transcript, leave one share: the sum carried half the planned noise."""
    import shutil

    out, _ = runs["secure-private"]
    assert _audit(out) == (0, [])  # negative control: the unedited split run
    plan = json.loads((out / "dp_plan.json").read_text())
    assert plan["statistics"]["placement"] == "split" and plan["statistics"]["min_clients"] == CLIENTS
    rows = [json.loads(line) for line in (out / "transcript.jsonl").read_text().splitlines()]
    r = 1  # the first k-means release
    dropped = {"client-1", "client-2", "client-3"}

    for name in ("refused", "removed"):
        edited, seen = [], set()
        for row in rows:
            if not (row["round"] == r and row["sender"] in dropped):
                edited.append(row)
            elif name == "refused" and row["sender"] not in seen:  # the reply becomes one refusal
                seen.add(row["sender"])
                keys = ("round", "stage", "sender", "receiver")
                edited.append(
                    {**{k: row[k] for k in keys}, "status": "refused", "field": None, "reason": "x"}
                )
        shutil.copytree(out, tmp_path / name)
        (tmp_path / name / "transcript.jsonl").write_text("".join(json.dumps(x) + "\n" for x in edited))
        code, problems = _audit(tmp_path / name)
        expected = (
            f"round {r}: the sum of clusters@round{r} (split noise) added 1 client uploads, the plan's "
            f"minimum cohort is {CLIENTS}: it carries less than the planned noise"
        )
        assert code == 1 and expected in problems, problems
        if name == "refused":
            assert problems == [expected]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "same", "other"), [("noise_placement", "split", "local"), ("min_clients", 4, 3)]
)
def test_a_placement_or_cohort_that_is_not_the_plans_fails_the_audit(runs, tmp_path, key, same, other):
    """The split run's configuration relabelled local, or its minimum cohort lowered, against a
    plan that split the noise over four clients. The same value written out passes."""
    import shutil

    out, _ = runs["secure-private"]
    shutil.copytree(out, tmp_path / "t")
    config_file = tmp_path / "t" / "config.json"
    config = json.loads(config_file.read_text())
    assert config[key] is None  # the defaults: split under secure, every client
    config_file.write_text(json.dumps(config | {key: same}))
    assert _audit(tmp_path / "t") == (0, [])
    if key == "min_clients":
        config_file.write_text(json.dumps(config | {key: other}))
        reasons = [f"config.json gives {key} {other!r}, dp_plan.json (or protocol.json) {same!r}"]
        assert _audit(tmp_path / "t") == (1, [f"{reason}: the plan is not this run's" for reason in reasons])
        return
    # Relabelled local, the configuration distils no classifier (its steps apply to split noise
    # only), and DP-SGD's placement follows the statistics': each differs from the plan.
    config_file.write_text(json.dumps(config | {key: other, "identifier_steps": None}))
    steps = json.loads((tmp_path / "t" / "dp_plan.json").read_text())["identifier_steps"]
    code, problems = _audit(tmp_path / "t")
    assert code == 1 and all(p.endswith(": the plan is not this run's") for p in problems), problems
    named = {p.removeprefix("config.json gives ").split(" ")[0] for p in problems}
    assert named == {"planned", key, "sgd_placement", "identifier_steps"}, problems
    assert f"identifier_steps 0, dp_plan.json (or protocol.json) {steps!r}" in " ".join(problems)


@pytest.mark.slow
def test_every_file_a_private_run_writes_is_data_only_and_the_check_can_tell(runs, tmp_path):
    import shutil

    import torch

    out, _ = runs["secure-private"]
    assert non_data_files(out) == []
    # Negative control: a checkpoint written with torch.save (a pickle) under the same name.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    torch.save({"components": torch.zeros(2)}, copy / "model.safetensors")
    (copy / "ledgers" / "extra.pt").write_bytes(b"\x80\x04K\x01.")  # pickle of 1
    assert [line.split(":")[0] for line in non_data_files(copy)] == ["ledgers/extra.pt", "model.safetensors"]
