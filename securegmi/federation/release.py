"""Release policies: what a client discloses each round, and how.

A `Client` holds one policy and one codec (`codec`). The policy turns the server's decoded
message into the values of the client's reply and the ledger event that covers each of them;
the codec decides how they travel. New privacy mechanisms are new policies, never new client
classes. Three policies:

- `PlainRelease`: what FedGMI computes, as it is (the plain protocol).
- `StatisticsRelease` (a `PrivateMixturePlan`, the default private design): the statistics
  phase (`statistics.StatisticsRole`), then DP-SGD on the VAEs with
  r(x) = softmax(log pi~ + log sum_j w_j(x) P(j | k)), every term a released value or the record
  itself (w(x): its soft assignment to the released fine clusters);
  it uploads w = n~ pi~ (post-processing of the histogram release) and w * theta.
- `CountsRelease` (a `DpPlan`, the earlier "em" design): soft counts every round. What it
  computes from its data, in order, and why each step is covered:
    1. ELBOs and r = softmax(log pi~ + ELBO / T) with pi~ from its LAST RELEASE, never from a
       private fixed point: r(x) must depend on x alone (and public or released values), or
       one record would move every other record's loss and DP-SGD's analysis would not hold.
    2. m~ = sum_x r(x) + N(0, sigma_m^2 I): L2 sensitivity 1, since ||r(x)||_2 <= ||r(x)||_1 = 1.
    3. pi~ = projection of m~ (post-processing); r recomputed with it (still per record).
    4. DP-SGD steps on sum_k r_k(x) (-ELBO_k(x)), clipped jointly over all K components.
    5. Upload w = max(m~, 0) and w * theta: post-processing of steps 2 and 4.
The two private policies share `DpMechanisms`: the ledger, private noise and DP-SGD trainer.
All three live in this one module (about 350 lines) so that a round crosses six federation
modules: server, transport, client, codec, release and local work (or the statistics role).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from securegmi.core.em import log_prior, mixture_estimate, mixture_loss, responsibilities
from securegmi.core.fine_clusters import CLASSIFIER_PREFIX, FineClusterModel
from securegmi.core.source_classifier import SourceClassifier
from securegmi.core.training import SharedAdam
from securegmi.crypto.signing import SigningKey
from securegmi.errors import PrivacyError, ProtocolViolation
from securegmi.federation.distillation import CLASSIFIER_SEED, ClassifierRole, pooled_prior
from securegmi.federation.local import LocalLearner, derive_seed
from securegmi.federation.statistics import StatisticsRole, downlink_stage, released
from securegmi.privacy.calibration import DpPlan, PrivateMixturePlan
from securegmi.privacy.dpsgd import DpSgdConfig, PrivateTrainer, check_privatisable, check_record_randomness
from securegmi.privacy.ledger import LedgerEntry, PrivacyBudget, PrivacyLedger
from securegmi.privacy.mechanisms import gaussian_release
from securegmi.privacy.noise import NoiseSource
from securegmi.vocabulary import EventId, EventName, FieldName, Stage


@dataclass(frozen=True)
class Reply:
    """The values of a client's reply, by field name, and the ledger event covering each."""

    stage: str
    values: Mapping[str, np.ndarray]
    events: Mapping[str, EventId] = field(default_factory=dict)


class ReleasePolicy(Protocol):
    @property
    def ledger(self) -> PrivacyLedger | None:
        """The privacy ledger; None for a policy that releases nothing under DP."""

    @property
    def identifier(self) -> FineClusterModel | None:
        """A source identifier built from released statistics, where the policy has one."""

    def respond(self, round_index: int, stage: str, inbound: Mapping[str, np.ndarray]) -> Reply:
        """The reply to the server's `stage` message of round `round_index` (decoded values)."""

    def conclude(self, round_index: int, stage: str, inbound: Mapping[str, np.ndarray]) -> None:
        """Take in the server's message without replying: the final aggregate of a run."""

    def state_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """What the policy carries from round to round, to rebuild it in a fresh process."""

    def load_state(self, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None: ...


def fedgmi_downlink(round_index: int) -> Stage:
    """The stage a FedGMI round answers: `start` in round 0, then the last round's sums."""
    return Stage.START if round_index == 0 else Stage.BROADCAST


def expect_stage(client_id: str, round_index: int, stage: str, expected: str) -> None:
    if stage != expected:
        raise ProtocolViolation(f"{client_id}: round {round_index} expects stage {expected!r}, got {stage!r}")


class PlainRelease:
    """Discloses what FedGMI computes, as it is: soft counts and w * theta (plain protocol)."""

    ledger: PrivacyLedger | None = None
    identifier: FineClusterModel | None = None

    def __init__(self, learner: LocalLearner) -> None:
        self.learner = learner

    def respond(self, round_index: int, stage: str, inbound: Mapping[str, np.ndarray]) -> Reply:
        expect_stage(self.learner.client_id, round_index, stage, fedgmi_downlink(round_index))
        self.learner.adopt(inbound)
        masses = self.learner.em_round(round_index, float(inbound[FieldName.TEMPERATURE]))
        return Reply(Stage.UPDATE, self.learner.upload(masses))

    def conclude(self, round_index: int, stage: str, inbound: Mapping[str, np.ndarray]) -> None:
        self.learner.adopt(inbound)

    def state_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        return {}, {}

    def load_state(self, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
        pass


@dataclass(frozen=True)
class ClientPrivacy:
    """A client's part of the federation's DP plan."""

    plan: DpPlan | PrivateMixturePlan
    batch_normaliser: float  # public divisor of the noisy DP-SGD sum
    ledger_path: Path | None = None  # written before anything leaves (write-ahead)
    # None: ChaCha20 keyed from OS entropy. An int makes the noise reproducible, for tests only:
    # anyone holding it could subtract the noise (privacy.noise).
    noise_seed: int | None = None
    # Under the statistics design: this client's position in the public cohort list (its block
    # of the histogram matrix) and the cohort's size.
    slot: int = 0
    cohort: int = 1

    @property
    def noise_source(self) -> str:
        """What the ledger's first link says of the noise (privacy.noise)."""
        return "private" if self.noise_seed is None else "seeded"

    def __post_init__(self) -> None:
        if not self.batch_normaliser > 0:
            raise PrivacyError(f"batch_normaliser must be positive, got {self.batch_normaliser}")
        if not 0 <= self.slot < self.cohort:
            raise PrivacyError(f"slot {self.slot} is outside the cohort of {self.cohort} clients")


class DpMechanisms:
    """A client's ledger, its private noise, and its DP-SGD trainer."""

    def __init__(
        self, learner: LocalLearner, privacy: ClientPrivacy, signing_key: SigningKey | None = None
    ) -> None:
        if learner.settings.weighting != "mass":
            raise PrivacyError("a DP client weights components by its released counts only")
        plan = privacy.plan
        self.learner, self.privacy = learner, privacy
        self.signing_key = signing_key  # signs each entry's chain link as it is committed
        self.ledger = PrivacyLedger(
            learner.client_id,
            PrivacyBudget(plan.epsilon, plan.delta),
            noise_source=privacy.noise_source,  # bound into its first link
        )
        if privacy.ledger_path is not None and privacy.ledger_path.exists():
            # What this client already spent (before a crash, say) counts, whatever else was lost.
            self._adopt(PrivacyLedger.load(privacy.ledger_path))
        self.noise = NoiseSource(privacy.noise_seed)
        self.noise_rng = self.noise.generator  # the statistics' and counts' Gaussian releases
        check_privatisable(learner.model)  # refused now, before anything is released
        check_record_randomness(learner.model, torch.as_tensor(learner.x[:2]))

    @cached_property
    def trainer(self) -> PrivateTrainer:
        """Built on first use: torch's first optimiser imports torch._dynamo (about 1.8 s of
        CPU), paid on every message by a Flower ClientApp, which runs in a fresh process each
        time, even when the message trains nothing."""
        plan, settings = self.privacy.plan, self.learner.settings
        self.learner.model.train()  # Opacus validates the module in training mode
        return PrivateTrainer(
            self.learner.model,
            torch.optim.Adam(self.learner.model.parameters(), lr=settings.learning_rate),
            DpSgdConfig(
                plan.sgd_noise_multiplier, plan.clip_norm, plan.sample_rate, self.privacy.batch_normaliser
            ),
            noise=self.noise,
        )

    def _adopt(self, ledger: PrivacyLedger) -> None:
        if ledger.noise_source != self.ledger.noise_source and ledger.entries:
            # A ledger keeps one noise source for the whole run: otherwise a run resumed with
            # seeded noise would go on under a first link that says "private".
            raise PrivacyError(
                f"{self.learner.client_id}: the saved ledger's releases used {ledger.noise_source} "
                f"noise, this client draws {self.ledger.noise_source} noise; resume with the run's own "
                "noise setting"
            )
        if ledger.client_id != self.learner.client_id or ledger.budget != self.ledger.budget:
            raise PrivacyError(
                f"{self.learner.client_id}: the saved ledger belongs to {ledger.client_id!r} with budget "
                f"{ledger.budget}; refusing to continue under a different identity or budget"
            )
        self.ledger = ledger

    def commit(self, entries: tuple[LedgerEntry, ...]) -> None:
        """Check, then commit, then persist: all before anything is computed for release.

        Entries the ledger already holds were committed before a crash that came before the
        reply was saved to the outbox, so nothing of them left the client: the release is drawn
        afresh and charged once."""
        self.ledger = self.ledger.check(tuple(e for e in entries if e not in self.ledger.entries))
        if self.signing_key is not None:
            self.ledger = self.ledger.signed(self.signing_key.sign)
        if self.privacy.ledger_path is not None:
            self.ledger.save(self.privacy.ledger_path)

    def train(self, resp: Tensor, steps: int, round_index: int) -> None:
        x = torch.as_tensor(self.learner.x)

        def per_sample_loss(module: nn.Module, batch: Tensor) -> Tensor:
            return mixture_loss(module(x[batch]), resp[batch])

        # A fresh Adam each round, as in the non-private client.
        self.trainer.optimiser.original_optimizer.state.clear()
        # The steps' public randomness (latent draws' contexts) from public values; which
        # records each step samples comes from the secret noise source (PrivateTrainer).
        public = derive_seed(self.learner.seed, round_index, self.learner.stream)
        self.trainer.train(per_sample_loss, len(x), steps, public)

    def state_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        arrays: dict[str, np.ndarray] = {}
        metadata = {"ledger": json.dumps(self.ledger.to_json(), sort_keys=True)}
        if self.privacy.noise_seed is not None:
            # Only reproducible test noise is carried over; private noise is never written
            # down, and a restored client draws fresh OS entropy instead.
            metadata["noise"] = json.dumps(self.noise.state())
        return arrays, metadata

    def load_state(self, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
        ledger = PrivacyLedger.from_json(json.loads(metadata["ledger"]))
        path = self.privacy.ledger_path
        if path is not None and path.exists():
            # The ledger file is written ahead of every release, the state after it: if a
            # process died in between, the file knows of a spend the state does not.
            on_disk = PrivacyLedger.load(path)
            if len(on_disk.entries) >= len(ledger.entries):
                ledger = on_disk
        self._adopt(ledger)
        if self.privacy.noise_seed is not None and "noise" in metadata:
            self.noise.restore(json.loads(metadata["noise"]))


class CountsRelease(DpMechanisms):
    """The em design (module docstring): DP soft counts and DP-SGD every round."""

    identifier: FineClusterModel | None = None

    def __init__(
        self, learner: LocalLearner, privacy: ClientPrivacy, signing_key: SigningKey | None = None
    ) -> None:
        if not isinstance(privacy.plan, DpPlan):
            raise PrivacyError(
                f"the em design's counts release follows a DpPlan, got a {type(privacy.plan).__name__}: "
                "build the client from the plan's own policy (Client chooses it from the plan)"
            )
        super().__init__(learner, privacy, signing_key)
        self.plan: DpPlan = privacy.plan

    def exact_counts(self, elbo: Tensor, temperature: float) -> np.ndarray:
        """sum_x r(x) with this client's last released pi as prior: the value the Gaussian
        mechanism releases, returned and never kept."""
        # Summed in float64: a float32 sum of n rows errs by ~n ulps, past the sensitivity of 1.
        return responsibilities(elbo, log_prior(self.learner.pi), temperature).double().sum(0).numpy()

    def respond(self, round_index: int, stage: str, inbound: Mapping[str, np.ndarray]) -> Reply:
        learner, s = self.learner, self.learner.settings
        expect_stage(learner.client_id, round_index, stage, fedgmi_downlink(round_index))
        learner.adopt(inbound)
        self.commit(self.plan.round_entries(round_index))
        learner.public_randomness(round_index)  # the ELBO's latent draws
        temperature = float(inbound[FieldName.TEMPERATURE])
        elbo = learner.elbo()
        # L2 sensitivity 1 under add/remove-one: ||r(x)||_2 <= ||r(x)||_1 = 1.
        noisy = gaussian_release(
            self.exact_counts(elbo, temperature), self.plan.count_noise_multiplier, 1.0, self.noise_rng
        )
        learner.pi = mixture_estimate(noisy, s.pi_floor)
        self.train(
            responsibilities(elbo, log_prior(learner.pi), temperature), self.plan.steps_per_round, round_index
        )
        counts_event = EventId(EventName.COUNTS, round_index)
        events: dict[str, EventId] = {
            FieldName.MASSES: counts_event,
            FieldName.COMPONENT_INDEX: counts_event,  # which components: a function of the released counts
            FieldName.WEIGHTED_COMPONENTS: EventId(EventName.DPSGD, round_index),
        }
        return Reply(Stage.UPDATE, learner.upload(noisy), events)

    def conclude(self, round_index: int, stage: str, inbound: Mapping[str, np.ndarray]) -> None:
        self.learner.adopt(inbound)


class StatisticsRelease(DpMechanisms):
    """The statistics design (module docstring)."""

    def __init__(
        self, learner: LocalLearner, privacy: ClientPrivacy, signing_key: SigningKey | None = None
    ) -> None:
        if not isinstance(privacy.plan, PrivateMixturePlan):
            raise PrivacyError(
                "the statistics design's release follows a PrivateMixturePlan, got a "
                f"{type(privacy.plan).__name__}: build the client from the plan's own policy (Client "
                "chooses it from the plan)"
            )
        super().__init__(learner, privacy, signing_key)
        self.plan: PrivateMixturePlan = privacy.plan
        self.statistics = StatisticsRole(
            learner.x,
            self.plan.statistics,
            learner.model.n_components,
            privacy.slot,
            privacy.cohort,
            learner.seed,
            self.noise_rng,
        )
        # Split DP-SGD: one trajectory every client follows, set up at the first VAE round.
        self.shared: SharedAdam | None = None
        self.resp: Tensor | None = None
        self.normaliser = 1.0
        # The source classifier's phase (federation.distillation), where the plan has one.
        self.distiller: ClassifierRole | None = None
        self.classifier: SourceClassifier | None = None
        self.teacher: Tensor | None = None

    @property
    def identifier(self) -> FineClusterModel | None:
        """The fine-cluster model, with the distilled classifier once its phase has ended."""
        model = self.statistics.state.model
        if model is None or self.classifier is None:
            return model
        return replace(model, classifier=self.classifier)

    def respond(self, round_index: int, stage: str, inbound: Mapping[str, np.ndarray]) -> Reply:
        t, stats, plan = round_index, self.plan.statistics, self.plan
        vae_start = stats.rounds + plan.identifier_steps
        if t <= stats.rounds:
            expected: str = downlink_stage(stats, t)
        elif t <= vae_start:
            expected = Stage.IDENTIFIER_TOTALS
        else:
            expected = Stage.GRADIENT_TOTALS if plan.split_sgd else Stage.BROADCAST
        expect_stage(self.learner.client_id, t, stage, expected)
        if t <= stats.rounds:
            total = None if t == 0 else inbound[FieldName.AGGREGATE].astype(np.float64)
            self.statistics.absorb(t, total)
        elif t <= vae_start:
            self._distiller().step(inbound[FieldName.AGGREGATE].astype(np.float64))
            if t == vae_start:  # the last step: from here the classifier scores with the clusters
                grouping = released(self.statistics.state.grouping, "the grouping of the fine clusters")
                self.classifier = self._distiller().classifier(pooled_prior(grouping.pi, grouping.sizes))
        else:
            self.conclude(t, stage, inbound)
        self.commit(plan.round_entries(t))
        if t < stats.rounds:
            stage, name, value = self.statistics.contribution(t)
            return Reply(stage, {name: value}, {name: EventId(stats.release_at(t), t)})
        dpsgd = EventId(EventName.DPSGD, t)
        if t < vae_start:
            share, gradient = self._distiller().share(self._teacher()), FieldName.IDENTIFIER_GRADIENT
            return Reply(Stage.IDENTIFIER_GRADIENT, {gradient: share}, {gradient: dpsgd})
        if self.plan.split_sgd:
            return Reply(
                Stage.GRADIENT, {FieldName.GRADIENT: self._gradient_share(t)}, {FieldName.GRADIENT: dpsgd}
            )
        histogram = EventId(EventName.HISTOGRAM, stats.rounds - 1)  # the weights are its post-processing
        events: dict[str, EventId] = {
            FieldName.MASSES: histogram,
            FieldName.COMPONENT_INDEX: histogram,
            FieldName.WEIGHTED_COMPONENTS: dpsgd,
        }
        return Reply(Stage.UPDATE, self.learner.upload(self._vae_round(t)), events)

    def conclude(self, round_index: int, stage: str, inbound: Mapping[str, np.ndarray]) -> None:
        """Take in a VAE-phase aggregate: under split DP-SGD the step every client takes with
        the decrypted gradient sum; otherwise the averaged components."""
        if not self.plan.split_sgd:
            self.learner.adopt(inbound)
            return
        self._shared_setup().step(inbound[FieldName.AGGREGATE] / self.normaliser)

    def _responsibilities(self) -> Tensor:
        """r(x) = softmax(log pi~ + log sum_j w_j(x) P(j | k)): pi~ and the fine clusters are
        released values, w(x) depends on x and them alone. Sets this client's pi to pi~."""
        learner, slot, state = self.learner, self.privacy.slot, self.statistics.state
        grouping = released(state.grouping, "the grouping of the fine clusters")
        model = released(self.identifier, "the fine-cluster model")
        pi = np.maximum(grouping.pi[slot], learner.settings.pi_floor)
        learner.pi = pi / pi.sum()
        scores = torch.as_tensor(model.log_likelihood(learner.x), dtype=torch.float32)
        return responsibilities(scores, log_prior(learner.pi))

    def _distiller(self) -> ClassifierRole:
        """The classifier's trainer, set up on first use (its divisor from the released sizes)."""
        if self.distiller is None:
            grouping = released(self.statistics.state.grouping, "the grouping of the fine clusters")
            self.distiller = ClassifierRole(
                self.statistics.u,
                self.plan,
                self.learner.model.n_components,
                derive_seed(self.learner.seed, CLASSIFIER_SEED),
                self.noise,
                grouping.sizes,
            )
        return self.distiller

    def _teacher(self) -> Tensor:
        """The classifier's targets: the fine-cluster model's responsibilities alone (the
        classifier is not part of its own teacher)."""
        if self.teacher is None:
            self.teacher = self._responsibilities()
        return self.teacher

    def _vae_round(self, round_index: int) -> np.ndarray:
        """Local DP-SGD on the VAEs; returns the weights n~ pi~, a function of the released
        histograms only."""
        self.train(self._responsibilities(), self.plan.steps_per_round, round_index)
        grouping = released(self.statistics.state.grouping, "the grouping of the fine clusters")
        return self.learner.pi * max(float(grouping.sizes[self.privacy.slot]), 0.0)

    def _shared_setup(self) -> SharedAdam:
        """The shared trajectory's optimiser, set up on first use with this client's
        responsibilities and the step's divisor."""
        if self.shared is None:
            grouping = released(self.statistics.state.grouping, "the grouping of the fine clusters")
            self.resp = self._responsibilities()
            # The divisor of the summed step: the expected pooled batch, from released sizes.
            self.normaliser = max(1.0, self.plan.sample_rate * float(np.maximum(grouping.sizes, 0).sum()))
            self.shared = SharedAdam(self.learner.model, self.learner.settings.learning_rate)
        return self.shared

    def _gradient_share(self, round_index: int) -> np.ndarray:
        """This client's clipped gradient sum over a private Poisson sample, plus its share of
        the step's noise (the sum over min_clients shares carries all of it)."""
        self._shared_setup()
        x, resp = torch.as_tensor(self.learner.x), released(self.resp, "the responsibilities")

        def per_sample_loss(module: nn.Module, batch: Tensor) -> Tensor:
            return mixture_loss(module(x[batch]), resp[batch])

        self.learner.public_randomness(round_index)  # the ELBO's latent draws
        batch = self.trainer.poisson_batch(len(x))
        return self.trainer.noisy_share(per_sample_loss, batch, self.plan.sgd_share_scale)

    def state_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        arrays, metadata = super().state_arrays()
        shared = {} if self.shared is None else self.shared.state_arrays()
        distilled = {} if self.distiller is None else self.distiller.state_arrays()
        classifier = {} if self.classifier is None else self.classifier.arrays(CLASSIFIER_PREFIX)
        return arrays | self.statistics.state_arrays() | shared | distilled | classifier, metadata

    def load_state(self, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
        super().load_state(arrays, metadata)
        self.statistics.load_state(arrays)
        if any(k.startswith("ident.") for k in arrays):
            self._distiller().load_state(arrays)
        self.classifier = SourceClassifier.from_arrays(dict(arrays), CLASSIFIER_PREFIX)
        if self.plan.split_sgd and any(k.startswith("adam.") for k in arrays):
            self._shared_setup().load_state(dict(arrays))
