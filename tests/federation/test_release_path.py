"""Every public path to component values of a secure run returns released values only: CKKS
decryptions pass the release function (rounded to the release grid, Li & Micciancio 2021)
before a client, a file or a caller sees them. Negative control: with the release function
removed, the same checks find exact decryptions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import securegmi
from securegmi.federation import codec as codec_module
from securegmi.protocol import Ciphertext
from securegmi.simulation import study as study_module
from securegmi.simulation.study import Federation
from tests.configs import private_config

CONFIG = private_config("secure", 8.0, hidden=8, min_clients=3, vae_rounds=2, kmeans_iterations=1)


def _off_grid(values: np.ndarray) -> bool:
    """Whether any value is not (the float32 copy of) a multiple of the release grid."""
    v = np.asarray(values)
    grid = Federation.build(CONFIG).ckks_parameters().release_grid()
    nearest = np.round(v.astype(np.float64) / grid) * grid
    return not np.array_equal(nearest.astype(v.dtype), v)


def _paths(out: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Run a secure study; for each public path, whether it held a value off the grid."""
    # Every ciphertext a client opens (the statistics' sums, split DP-SGD's gradient sums),
    # at the codec, where each is decrypted: public fields (counts of shares) are not values.
    opened: list[np.ndarray] = []
    real_open = codec_module.CkksCodec.open

    def spy(self, message, spec):  # type: ignore[no-untyped-def]
        out = real_open(self, message, spec)
        public = {n for n, f in message.payload.items() if not isinstance(f, Ciphertext)}
        opened.extend(v for k, v in out.items() if k not in public)
        return out

    monkeypatch.setattr(codec_module.CkksCodec, "open", spy)
    securegmi.simulate(CONFIG, out=out)
    trained = securegmi.load(out)
    return {
        "what every client opened": any(_off_grid(v) for v in opened),
        "model.safetensors": any(_off_grid(v) for v in load_file(str(out / "model.safetensors")).values()),
        "securegmi.load(...).components": _off_grid(trained.components.get_component_vectors()),
    }


@pytest.mark.slow
def test_every_public_path_returns_released_values_and_the_check_can_tell(tmp_path, monkeypatch):
    assert _paths(tmp_path / "honest", monkeypatch) == {
        "what every client opened": False,
        "model.safetensors": False,
        "securegmi.load(...).components": False,
    }
    # Negative control: without the release function every path carries exact decryptions.
    monkeypatch.setattr(codec_module, "release_decrypted", lambda values, precision: values)
    monkeypatch.setattr(study_module, "release_decrypted", lambda values, precision: values)
    assert all(_paths(tmp_path / "bypass", monkeypatch).values())
