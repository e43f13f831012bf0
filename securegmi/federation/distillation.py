"""The source classifier's phase, as a client plays it (docs/design.md §2).

Between the statistics and the VAEs, every client trains the same small classifier
(`core.source_classifier`) on its records u (the unit-sphere map the statistics use) with the
fine-cluster model's responsibilities as targets: `identifier_steps` full-batch DP-SGD steps,
one round each. Each round a client sends its clipped per-record gradient sum plus its share of
the noise (split as the VAEs' steps are); every client takes the same Adam step with the
decrypted sum, so all follow one trajectory, as one curator over the pooled records would.

The targets are a function of the record and of released values only (the fine clusters, the
grouping and this client's released pi), so each step is one Gaussian mechanism on a sum of
per-record contributions of norm at most the clipping bound: the record moves its own gradient
and nothing else (DESIGN §2, law 1). No step draws randomness from a record's position: the
batch is every record, the initialisation a public seed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from securegmi.core.source_classifier import SourceClassifier, classifier_module
from securegmi.core.training import SharedAdam
from securegmi.privacy.calibration import PrivateMixturePlan
from securegmi.privacy.dpsgd import DpSgdConfig, PerSampleLoss, PrivateTrainer
from securegmi.privacy.noise import NoiseSource

# Adam's step size for the classifier: every client must take the same, so it is the package's,
# not a client's setting (bench/results/tuning.md#source-classifier).
LEARNING_RATE = 0.1
# A public seed's salt for the classifier's initialisation (every client draws the same).
CLASSIFIER_SEED = 0x1D
_PARAMETERS, _ADAM = "ident.param.", "ident.adam."


def pooled_prior(pi: np.ndarray, sizes: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """The clients' released pis averaged by their released sizes: the prior the classifier
    learns under (post-processing of the histogram release)."""
    weights = np.maximum(np.asarray(sizes, dtype=np.float64), 0.0)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    prior = np.maximum((weights[:, None] * pi).sum(0) / weights.sum(), floor)
    out: np.ndarray = prior / prior.sum()
    return out


class ClassifierRole:
    """One client's part in training the source classifier."""

    def __init__(
        self,
        u: np.ndarray,
        plan: PrivateMixturePlan,
        components: int,
        seed: int,
        noise: NoiseSource,
        sizes: np.ndarray,
    ) -> None:
        """`sizes`: the clients' released record counts, whose sum divides each step's sum."""
        self.u = torch.as_tensor(np.ascontiguousarray(u, dtype=np.float32))
        normaliser = max(1.0, float(np.maximum(np.asarray(sizes, dtype=np.float64), 0.0).sum()))
        self.plan = plan
        # Public: every client builds the same start from the federation's seed.
        self.module = classifier_module(self.u.shape[1], plan.identifier_hidden, components, seed)
        self.module.train()
        self.shared = SharedAdam(self.module, LEARNING_RATE)
        self.trainer = PrivateTrainer(
            self.module,
            torch.optim.SGD(self.module.parameters(), lr=0.0),  # never steps: SharedAdam does
            DpSgdConfig(plan.identifier_noise_multiplier, plan.clip_norm, 1.0, normaliser),
            noise=noise,
        )
        self.normaliser = normaliser

    def loss(self, targets: Tensor) -> PerSampleLoss:
        """Each record's soft cross-entropy against its target."""
        u = self.u

        def per_sample_loss(module: nn.Module, batch: Tensor) -> Tensor:
            log_q = torch.log_softmax(module(u[batch]), dim=1)
            loss: Tensor = -(targets[batch] * log_q).sum(1)
            return loss

        return per_sample_loss

    def share(self, targets: Tensor) -> np.ndarray:
        """This round's release: the clipped gradient sum over every record of the soft
        cross-entropy against `targets`, plus this client's share of the step's noise."""
        every = torch.arange(len(self.u))
        return self.trainer.noisy_share(self.loss(targets), every, self.plan.sgd_share_scale)

    def step(self, aggregate: np.ndarray) -> None:
        """The step every client takes with the decrypted sum."""
        self.shared.step(aggregate / self.normaliser)

    def classifier(self, prior: np.ndarray) -> SourceClassifier:
        return SourceClassifier.from_module(self.module, prior)

    def state_arrays(self) -> dict[str, np.ndarray]:
        params = {
            f"{_PARAMETERS}{i}": p.detach().numpy().copy() for i, p in enumerate(self.module.parameters())
        }
        return params | self.shared.state_arrays(_ADAM)

    def load_state(self, a: Mapping[str, np.ndarray]) -> None:
        if f"{_PARAMETERS}0" not in a:
            return
        with torch.no_grad():
            for i, p in enumerate(self.module.parameters()):
                p.copy_(torch.as_tensor(a[f"{_PARAMETERS}{i}"]))
        self.shared.load_state(dict(a), _ADAM)
