"""`securegmi.load(RUN_DIR)`: the trained mixture of a finished run, to use on new records.

What it reads is what the run exported: `model.safetensors` (the K components, the training
clients' pi and, for a private run of the statistics design, the source identifier) and
`config.json`. A secure run's export already passed the release function (rounded decrypted
values), so nothing here can reach an exact CKKS decryption.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from securegmi.config import OWN_DATA, SimulationConfig
from securegmi.core.em import fixed_point_pi, log_prior, responsibilities
from securegmi.core.fine_clusters import FineClusterModel
from securegmi.core.mixture import (
    IWAE_SAMPLES,
    SCORE_SAMPLES,
    ComponentFactory,
    MixtureOfVAEs,
    score_in_blocks,
)
from securegmi.data.datasets import load_dataset
from securegmi.errors import ConfigError, DataError, RunDirectoryError
from securegmi.files import JSON_FILE, MODEL_FILE, read_bytes, read_json, safetensors_arrays
from securegmi.records.rundir import CHECKPOINT, CONFIG

_SEED = 2_147  # the public context of every record's draws when a trained model scores it
# A floor that only keeps log pi finite: a site's estimate may drive a component to ~0.
_PI_FLOOR = 1e-12
# EM's cap here: a new site's records may be many, and where components are near-identical EM
# creeps (5,000 records: about 2.6 ms an iteration, so 26 s at core.em's cap of 10,000).
_PI_ITERATIONS = 1_000


class TrainedMixture:
    """K frozen components and, where the run has one, the statistics-based source identifier.

    Records come as an (n, D) array with the run's feature count, scaled as its training data
    (intensities in [0, 1] for the embedded image sets). `load` gives one for a run directory;
    from your own loop, build it from a client that took part:
    ``TrainedMixture(client.components, client.pi, client.identifier, data_dim=D)``. Its
    components are a copy: scoring never changes the client's model."""

    def __init__(
        self,
        components: MixtureOfVAEs,
        training_pi: np.ndarray,
        identifier: FineClusterModel | None = None,
        *,
        data_dim: int,
        config: SimulationConfig | None = None,
    ) -> None:
        components.check(data_dim)
        pi = np.atleast_2d(np.asarray(training_pi, dtype=np.float64))
        if pi.shape[1] != components.n_components:
            raise ConfigError(
                f"training_pi has {pi.shape[1]} proportions for {components.n_components} components"
            )
        self.components, self.identifier = copy.deepcopy(components), identifier
        self.training_pi = pi  # (clients, K): the pi each training client ended with
        self.data_dim = data_dim
        self.config = config  # the run's configuration, where it came from a run directory
        self.components.eval()

    @property
    def n_components(self) -> int:
        return self.components.n_components

    def _records(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise DataError(f"records come as a non-empty (n, features) array, got shape {x.shape}")
        if x.shape[1] != self.data_dim:
            raise DataError(
                f"this model was trained on {self.data_dim} features per record, got {x.shape[1]}"
            )
        if not np.isfinite(x).all():
            raise DataError("records contain NaN or infinite values")
        self.components.check_records(x)  # as a Client refuses them
        return x

    def log_likelihoods(self, x: np.ndarray) -> np.ndarray:
        """(n, K) per-component scores that identify sources: log P(fine cluster | k) for a
        private run of the statistics design, the ELBO otherwise."""
        x = self._records(x)
        if self.identifier is not None:
            return self.identifier.log_likelihood(x)
        return score_in_blocks(lambda block: self.components.elbo_matrix(block, SCORE_SAMPLES), x, _SEED)

    def estimate_pi(self, x: np.ndarray) -> np.ndarray:
        """The mixture proportions of a site from its records alone (E-steps, frozen components):
        how a site that did not take part in training learns its pi."""
        return self._estimate_pi(torch.as_tensor(self.log_likelihoods(x), dtype=torch.float32))

    def _estimate_pi(self, scores: Tensor) -> np.ndarray:
        uniform = np.full(self.n_components, 1.0 / self.n_components)
        return fixed_point_pi(scores, uniform, _PI_FLOOR, _PI_ITERATIONS)

    def responsibilities(self, x: np.ndarray, pi: np.ndarray | None = None) -> np.ndarray:
        """(n, K) posterior over components; `pi` defaults to the records' own estimate."""
        scores = torch.as_tensor(self.log_likelihoods(x), dtype=torch.float32)
        prior = self._estimate_pi(scores) if pi is None else self._pi(pi)
        out: np.ndarray = responsibilities(scores, log_prior(np.maximum(prior, 1e-12))).numpy()
        return out

    def assign(self, x: np.ndarray, pi: np.ndarray | None = None) -> np.ndarray:
        """The most likely component of each record."""
        out: np.ndarray = self.responsibilities(x, pi).argmax(1)
        return out

    def log_density(self, x: np.ndarray, pi: np.ndarray | None = None) -> np.ndarray:
        """Per record, the importance-weighted bound on log sum_k pi_k p_k(x) in nats (the VAEs'
        density, whatever identifies sources); `pi` defaults to the records' own estimate."""
        prior = self.estimate_pi(x) if pi is None else self._pi(pi)
        iwae = score_in_blocks(
            lambda block: self.components.iwae_matrix(block, IWAE_SAMPLES), self._records(x), _SEED
        )
        out: np.ndarray = torch.logsumexp(
            log_prior(np.maximum(prior, 1e-12)) + torch.as_tensor(iwae), dim=1
        ).numpy()
        return out

    def sample(self, n: int, component: int | None = None, seed: int = 0) -> np.ndarray:
        """`n` expected records decoded from the prior: of one component, or of each component in
        turn (n per component, stacked) when `component` is None."""
        if n < 1:
            raise ConfigError(f"n must be at least 1, got {n}")
        ks = range(self.n_components) if component is None else [component]
        if component is not None and not 0 <= component < self.n_components:
            raise ConfigError(f"component must be in [0, {self.n_components}), got {component}")
        generator = torch.Generator().manual_seed(seed)
        rows = []
        with torch.no_grad():
            for k in ks:
                vae = self.components.component(k)
                out = vae.decoder(torch.randn((n, vae.latent), generator=generator))
                mean = torch.sigmoid(out) if vae.likelihood == "bernoulli" else out.chunk(2, dim=-1)[0]
                rows.append(mean.numpy())
        return np.concatenate(rows)

    def _pi(self, pi: np.ndarray) -> np.ndarray:
        p = np.asarray(pi, dtype=np.float64)
        if p.shape != (self.n_components,) or not np.isfinite(p).all() or p.min() < 0 or p.sum() <= 0:
            raise DataError(f"pi must be {self.n_components} non-negative proportions, got {pi!r}")
        out: np.ndarray = p / p.sum()
        return out


def load(run_dir: Path | str, components: ComponentFactory | None = None) -> TrainedMixture:
    """The trained mixture of a finished run directory: one `securegmi simulate` wrote, or one
    `securegmi.save` wrote for your own loop. For the latter, `components` is the factory you
    built your components with (one VAE per call, as `MixtureOfVAEs.from_factory` takes it):
    its parameters are then replaced by the run's, read as safetensors (never unpickled).

    Raises `RunDirectoryError` for a directory that is not a finished run's or whose files are
    not the ones securegmi wrote (unreadable, a link or FIFO, too large, corrupt, of the wrong
    shapes, or with non-finite parameters), `ConfigError` for a configuration this version
    cannot run or a bring-your-own run loaded without its factory, and `DataError` for a
    dataset that cannot be loaded here."""
    path = Path(run_dir)
    if not os.path.lexists(path / CONFIG) or not os.path.lexists(path / CHECKPOINT):
        raise RunDirectoryError(
            f"{path} has no {CONFIG} and {CHECKPOINT}: not the directory of a finished run "
            "(local training and the central-DP reference export no shared model)"
        )
    stored = read_json(path / CONFIG, JSON_FILE)
    if not isinstance(stored, dict):
        raise RunDirectoryError(f"{path / CONFIG} does not hold a configuration object")
    try:
        config = SimulationConfig.from_dict(stored)
    except ConfigError as exc:
        raise RunDirectoryError(f"{path / CONFIG} is not a configuration securegmi wrote: {exc}") from exc
    arrays, metadata = safetensors_arrays(read_bytes(path / CHECKPOINT, MODEL_FILE), path / CHECKPOINT)
    if config.dataset == OWN_DATA:
        model, dim = _own_components(config, metadata, components, path)
    else:
        data = load_dataset(config.dataset)
        dim = int(data.x.shape[1])
        model = MixtureOfVAEs.mlp(
            config.model_components,
            dim,
            config.hidden,
            config.latent,
            "bernoulli" if data.likelihood == "bernoulli" else "gaussian",
            seed=config.seed,
        )
    k = model.n_components
    where = f"{path / CHECKPOINT}"
    missing = sorted({"components", "pi"} - set(arrays))
    if missing:
        raise RunDirectoryError(f"{where} lacks the arrays {missing}: not a model securegmi exported")
    for name, array in arrays.items():
        # A NaN or infinite parameter would make every score NaN and argmax answer 0 regardless.
        if array.dtype.kind not in "fiu" or not np.isfinite(array).all():
            raise RunDirectoryError(
                f"{where}: array {name!r} holds non-finite or non-numeric values: the model is corrupt"
            )
    pi = np.asarray(arrays["pi"], dtype=np.float64)
    if pi.ndim != 2 or pi.shape[1] != k:
        raise RunDirectoryError(f"{where}: pi has shape {pi.shape}, expected (clients, {k})")
    try:
        model.set_component_vectors(np.asarray(arrays["components"], dtype=np.float32))
    except ConfigError as exc:
        raise RunDirectoryError(f"{where} does not fit the run's configuration: {exc}") from exc
    identifier = _identifier(arrays, k, dim, where) if "stats.centroids" in arrays else None
    return TrainedMixture(model, pi, identifier, data_dim=dim, config=config)


def _own_components(
    config: SimulationConfig, metadata: dict[str, str], factory: ComponentFactory | None, path: Path
) -> tuple[MixtureOfVAEs, int]:
    """The components of a bring-your-own run, rebuilt with the user's factory (their
    architecture is theirs: the run directory holds its parameters and feature count only)."""
    if factory is None:
        raise ConfigError(
            f"{path} is a run of your own components: pass the factory you built them with, "
            "securegmi.load(run_dir, components=my_component)"
        )
    try:
        dim = int(metadata["features"])
    except (KeyError, ValueError) as exc:
        raise RunDirectoryError(f"{path / CHECKPOINT} does not record the records' feature count") from exc
    model = MixtureOfVAEs.from_factory(factory, config.model_components, config.seed)
    try:
        model.check(dim)
    except ConfigError as exc:
        raise ConfigError(f"the factory's components do not fit this run's records: {exc}") from exc
    return model, dim


def _identifier(arrays: dict[str, np.ndarray], components: int, dim: int, where: str) -> FineClusterModel:
    """The saved source identifier, tried on one record so that wrong shapes fail here and not
    at the first `assign`."""
    try:
        identifier = FineClusterModel.from_arrays(arrays)
        centroids, table = identifier.centroids, identifier.cluster_given_component
        if centroids.ndim != 2 or table.shape != (components, centroids.shape[0]):
            raise ValueError(
                f"fine clusters of shape {centroids.shape} and a cluster-given-component table of "
                f"shape {table.shape}, expected ({components}, clusters)"
            )
        probe = identifier.log_likelihood(np.full((1, dim), identifier.centre, dtype=np.float32))
        if probe.shape != (1, components) or not np.isfinite(probe).all():
            raise ValueError(
                f"it scores a record as shape {probe.shape} (expected (1, {components})), finite: "
                f"{bool(np.isfinite(probe).all())}"
            )
    except (KeyError, IndexError, ValueError, TypeError, ArithmeticError) as exc:
        raise RunDirectoryError(f"{where}: the saved source identifier is corrupt ({exc!r:.160})") from exc
    return identifier
