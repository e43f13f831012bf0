"""Bring your own components and data: `securegmi.Client`, its validation, and its state."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import securegmi
from securegmi import VAE, Client, MixtureOfVAEs
from securegmi.errors import ConfigError, CryptoError, DataError, PrivacyError, ProtocolViolation
from securegmi.federation.client import as_records
from securegmi.federation.local import ClientSettings, client_stream
from securegmi.federation.release import ClientPrivacy
from securegmi.federation.server import Server
from securegmi.privacy.calibration import calibrate
from securegmi.privacy.ledger import PrivacyBudget, PrivacyLedger
from securegmi.protocol import decode, encode
from securegmi.protocol.registry import builder

ROOT = Path(__file__).resolve().parents[2]
LATENT = 2
SETTINGS = ClientSettings(
    local_epochs=1, batch_size=16, learning_rate=2e-3, elbo_samples=1, e_step_iterations=2, pi_floor=1e-3
)
PLAN = calibrate(PrivacyBudget(8.0, 1e-5), rounds=3, steps_per_round=2, sample_rate=0.25)


def _component(norm: type[nn.Module] = nn.LayerNorm) -> VAE:
    encoder = nn.Sequential(nn.Linear(64, 24), norm(24), nn.ELU(), nn.Linear(24, 2 * LATENT))
    decoder = nn.Sequential(nn.Linear(LATENT, 24), nn.ELU(), nn.Linear(24, 64))
    return VAE(encoder, decoder, LATENT, "bernoulli")


def _mixture() -> MixtureOfVAEs:
    return MixtureOfVAEs.from_factory(_component, 2, seed=0)


def _records(n: int = 48) -> np.ndarray:
    return (load_digits().data[:n] / 16.0).astype(np.float32)


def _spec(name: str = "dp"):  # type: ignore[no-untyped-def]
    return builder(name)(components=2, parameters=_mixture().parameter_count())


def _private_client(  # type: ignore[no-untyped-def]
    name: str = "site-a", components: MixtureOfVAEs | None = None, **kwargs
) -> Client:
    """A DP client with private noise and no files."""
    privacy = ClientPrivacy(PLAN, 16.0)
    components = components if components is not None else _mixture()
    return Client(name, components, _records(), _spec(), settings=SETTINGS, privacy=privacy, **kwargs)


def _dp_client(tmp_path: Path, **kwargs) -> Client:  # type: ignore[no-untyped-def]
    privacy = ClientPrivacy(PLAN, 16.0, tmp_path / "ledger.json", noise_seed=7)
    return Client("site-a", _mixture(), _records(), _spec(), settings=SETTINGS, privacy=privacy, **kwargs)


def _rounds(client: Client, server: Server, rounds: range) -> list[bytes]:
    out = []
    for t in rounds:
        reply = client.handle(server.broadcast(t, 2.0))
        server.aggregate({client.client_id: reply})
        out.append(encode(reply))
    return out


def test_own_components_train_under_dp_and_only_declared_fields_leave():
    client = _private_client()
    server = Server(_spec())
    before = client.components.get_component_vectors()
    reply = client.handle(server.broadcast(0, 2.0))
    assert set(reply.payload) == {"masses", "component_index", "weighted_components"}
    assert all(type(f).__name__ == "DpRelease" for f in reply.payload.values())
    assert not np.allclose(client.components.get_component_vectors(), before)  # it trained
    assert client.ledger is not None and 0 < client.ledger.spent <= 8.0


def test_array_tensor_dataset_and_dataloader_give_the_same_records():
    x = _records()
    labels = torch.zeros(len(x))
    dataset = TensorDataset(torch.from_numpy(x), labels)
    images = torch.from_numpy(x).reshape(-1, 1, 8, 8)  # an image per record is flattened
    for data in (torch.from_numpy(x), dataset, DataLoader(dataset, batch_size=10), images):
        np.testing.assert_array_equal(as_records(data), x)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros((0, 64), dtype=np.float32), "no records"),
        (np.full((4, 64), np.nan, dtype=np.float32), "NaN"),
        (np.full((4, 64), 3.0, dtype=np.float32), "Bernoulli"),
        (np.zeros((4, 63), dtype=np.float32), "encoder"),
    ],
)
def test_unusable_records_are_refused_with_the_reason(data, message):
    with pytest.raises((DataError, ConfigError), match=message):
        Client("site-a", _mixture(), data, _spec("plain"), settings=SETTINGS)


def test_batchnorm_component_is_refused_with_the_fix_and_layernorm_is_not():
    bad = MixtureOfVAEs.from_factory(lambda: _component(nn.BatchNorm1d), 2, seed=0)
    with pytest.raises(PrivacyError, match="GroupNorm"):
        _private_client(components=bad)
    # Negative control: the same architecture with LayerNorm is privatised.
    _private_client()


def test_an_encoder_with_the_wrong_output_is_refused_naming_the_shapes():
    def wrong() -> VAE:
        return VAE(nn.Linear(64, LATENT), nn.Linear(LATENT, 64), LATENT, "bernoulli")  # mu only

    with pytest.raises(ConfigError, match=r"\(batch, 4\).*returned \(2, 2\)"):
        Client("site-a", MixtureOfVAEs.from_factory(wrong, 2, 0), _records(), _spec("plain"))


def test_components_that_do_not_match_the_protocols_shapes_are_refused():
    mlp_spec = builder("plain")(
        components=2, parameters=MixtureOfVAEs.mlp(2, 64, 32, 2, "bernoulli", 0).parameter_count()
    )
    with pytest.raises(ConfigError, match="declares P"):
        Client("site-a", _mixture(), _records(), mlp_spec)
    with pytest.raises(ConfigError, match="declares K"):
        Client("site-a", MixtureOfVAEs.from_factory(_component, 3, 0), _records(), _spec("plain"))


def test_a_client_must_bring_what_its_protocol_requires():
    with pytest.raises(PrivacyError, match="privacy="):
        Client("site-a", _mixture(), _records(), _spec("dp"))
    with pytest.raises(CryptoError, match="keys="):
        Client("site-a", _mixture(), _records(), _spec("secure"), privacy=ClientPrivacy(PLAN, 16.0))
    with pytest.raises(ConfigError, match="no DP release"):
        Client("site-a", _mixture(), _records(), _spec("plain"), privacy=ClientPrivacy(PLAN, 16.0))


def test_a_restored_client_continues_exactly_like_an_uninterrupted_one(tmp_path):
    uninterrupted = _rounds(_dp_client(tmp_path / "a"), Server(_spec(), run_id="run-1"), range(3))

    state = tmp_path / "b" / "state.safetensors"
    server = Server(_spec(), run_id="run-1")
    first = _rounds(_dp_client(tmp_path / "b", state_path=state), server, range(1))
    # A fresh process: a new object that only has the state file.
    resumed = _rounds(_dp_client(tmp_path / "b", state_path=state), server, range(1, 3))
    assert first + resumed == uninterrupted

    # Negative control: without the state the new object starts over and answers differently.
    server = Server(_spec(), run_id="run-1")
    _rounds(_dp_client(tmp_path / "c"), server, range(1))
    assert _rounds(_dp_client(tmp_path / "c"), server, range(1, 3)) != uninterrupted[1:]


def test_a_spend_on_the_ledger_file_is_never_forgotten_on_restore(tmp_path):
    state = tmp_path / "state.safetensors"
    server = Server(_spec())
    _rounds(_dp_client(tmp_path, state_path=state), server, range(1))
    shutil.copy(state, tmp_path / "after-round-0")
    _rounds(_dp_client(tmp_path, state_path=state), server, range(1, 2))
    # The process died after the ledger's write-ahead of round 1 but its state is of round 0.
    shutil.copy(tmp_path / "after-round-0", state)
    restored = _dp_client(tmp_path, state_path=state).ledger
    assert restored is not None and {e.round for e in restored.entries} == {0, 1}
    # Negative control: without the ledger file, the state alone knows of round 0 only.
    (tmp_path / "ledger.json").unlink()
    alone = _dp_client(tmp_path, state_path=state).ledger
    assert alone is not None and {e.round for e in alone.entries} == {0}


def test_a_state_file_of_another_client_is_refused(tmp_path):
    state = tmp_path / "state.safetensors"
    server = Server(_spec())
    _rounds(_dp_client(tmp_path, state_path=state), server, range(1))
    with pytest.raises(Exception, match="holds the state of 'site-a'"):
        _private_client("site-b", state_path=state)


def test_user_chosen_ids_get_distinct_stable_random_streams():
    assert client_stream("client-7") == 7  # the simulator's ids keep their streams
    assert client_stream("hospital-a") == client_stream("hospital-a")
    assert client_stream("hospital-a") != client_stream("hospital-b")


def _deep_imports(source: str) -> list[str]:
    """securegmi modules imported below the front door (`import securegmi`, `from securegmi import`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("securegmi.")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("securegmi."):
            found.append(str(node.module))
    return found


def test_the_example_needs_only_the_front_door():
    assert _deep_imports((ROOT / "examples" / "bring_your_own_model.py").read_text()) == []
    # Negative control: a deep import is reported.
    assert _deep_imports("from securegmi.federation.server import Server\n") == [
        "securegmi.federation.server"
    ]
    # Everything the front door lists is importable from it.
    assert all(hasattr(securegmi, name) for name in securegmi.__all__)


def test_a_resent_message_gets_the_identical_reply_and_no_second_charge(tmp_path):
    """The write-ahead outbox: a message the client already answered (the server resends it
    after a crash) gets the same bytes, from the saved state too, and the ledger does not
    grow; an earlier round after a later one is a replay and is refused."""
    state = tmp_path / "state.safetensors"
    server = Server(_spec(), run_id="run-1")
    client = _dp_client(tmp_path, state_path=state)
    first = server.broadcast(0, 2.0)
    reply = encode(client.handle(first))
    entries = len(client.ledger.entries)  # type: ignore[union-attr]
    assert encode(client.handle(first)) == reply
    restored = _dp_client(tmp_path, state_path=state)  # a fresh process, from the saved state
    assert encode(restored.handle(first)) == reply
    assert len(restored.ledger.entries) == entries  # type: ignore[union-attr]
    server.aggregate({"site-a": decode(reply)})
    restored.handle(server.broadcast(1, 2.0))
    with pytest.raises(ProtocolViolation, match="a replay, refused"):
        restored.handle(first)


def test_a_crash_after_the_ledger_commit_is_charged_once(tmp_path):
    """The ledger is written before the release is computed; a client that dies before its
    reply is saved has sent nothing, so on restart it computes the release afresh and the
    ledger keeps the one charge (no repeated (round, release) entry)."""
    state = tmp_path / "state.safetensors"
    server = Server(_spec(), run_id="run-1")
    broadcast = server.broadcast(0, 2.0)
    crashing = _dp_client(tmp_path, state_path=state)

    def die(*args: object) -> None:
        raise RuntimeError("killed")

    crashing.learner.upload = die  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        crashing.handle(broadcast)
    charged = PrivacyLedger.load(tmp_path / "ledger.json").entries
    assert charged and not state.exists()  # charged, and no reply was saved or sent
    restarted = _dp_client(tmp_path, state_path=state)
    assert restarted.ledger.entries == charged  # type: ignore[union-attr]  # the ledger file is the truth
    restarted.handle(broadcast)
    assert restarted.ledger.entries == charged  # type: ignore[union-attr]
