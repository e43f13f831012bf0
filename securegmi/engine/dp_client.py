"""A FedGMI client whose every release is differentially private and on its ledger (DESIGN §2)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from securegmi.core.em import log_prior, mixture_estimate, mixture_loss, responsibilities
from securegmi.core.fine_clusters import FineClusterModel
from securegmi.core.mixture import MixtureOfVAEs
from securegmi.core.training import e_step_elbo
from securegmi.engine.client import BROADCAST, ClientSettings, FedGMIClient, payload_array
from securegmi.engine.seeding import seed_torch
from securegmi.engine.statistics import AGGREGATE_FIELD, StatisticsRole, downlink_stage
from securegmi.errors import PrivacyError, ProtocolViolation
from securegmi.privacy.calibration import COUNTS, DPSGD, HISTOGRAM, DpPlan, PrivateMixturePlan
from securegmi.privacy.dpsgd import DpSgdConfig, GradObserver, PrivateTrainer
from securegmi.privacy.ledger import LedgerEntry, PrivacyBudget, PrivacyLedger
from securegmi.privacy.mechanisms import gaussian_release
from securegmi.privacy.noise import noise_generators
from securegmi.protocol import Message, ProtocolSpec
from securegmi.protocol.payload import build_payload


@dataclass(frozen=True)
class ClientPrivacy:
    plan: DpPlan | PrivateMixturePlan
    batch_normaliser: float  # public divisor of the noisy DP-SGD sum
    ledger_path: Path | None = None  # written before anything leaves (write-ahead)
    # None: noise from OS entropy. An int makes the noise reproducible, for tests only: anyone
    # holding it could subtract the noise (privacy.noise).
    noise_seed: int | None = None
    # Under the statistics design: this client's position in the public cohort list (its block
    # of the histogram matrix) and the cohort's size.
    slot: int = 0
    cohort: int = 1


class DpFedGMIClient(FedGMIClient):
    """A client whose every release is DP and on its ledger, under one of two designs.

    The statistics design (a `PrivateMixturePlan`, the default): the statistics phase is played
    by its `StatisticsRole` (engine.statistics); then each VAE round trains with DP-SGD on
    r(x) = softmax(log pi~ + log P(j(x) | k)), every term a released value or the record itself,
    and uploads w = n~ pi~ (post-processing of the histogram release) and w * theta.

    The em design (a `DpPlan`): soft counts every round. What it computes from its data, in
    order, and why each step is covered:
      1. ELBOs and r = softmax(log pi~ + ELBO / T) with pi~ from its LAST RELEASE, never from a
         private fixed point: r(x) must depend on x alone (and public or released values), or
         one record would move every other record's loss and DP-SGD's analysis would not hold.
      2. m~ = sum_x r(x) + N(0, sigma_m^2 I): L2 sensitivity 1, since ||r(x)||_2 <= ||r(x)||_1 = 1.
      3. pi~ = projection of m~ (post-processing); r recomputed with it (still per record).
      4. DP-SGD steps on sum_k r_k(x) (-ELBO_k(x)), clipped jointly over all K components.
      5. Upload w = max(m~, 0) and w * theta: post-processing of steps 2 and 4.
    """

    def __init__(
        self,
        client_id: str,
        x_train: np.ndarray,
        model: MixtureOfVAEs,
        settings: ClientSettings,
        spec: ProtocolSpec,
        seed: int,
        privacy: ClientPrivacy,
    ) -> None:
        if settings.weighting != "mass":
            raise PrivacyError("a DP client weights components by its released counts only")
        super().__init__(client_id, x_train, model, settings, spec, seed)
        self.privacy = privacy
        plan = privacy.plan
        self.ledger = PrivacyLedger(client_id, PrivacyBudget(plan.epsilon, plan.delta))
        self.noise_rng, self.torch_noise = noise_generators(privacy.noise_seed)
        self.trainer = PrivateTrainer(
            model,
            torch.optim.Adam(model.parameters(), lr=settings.learning_rate),
            DpSgdConfig(
                plan.sgd_noise_multiplier, plan.clip_norm, plan.sample_rate, privacy.batch_normaliser
            ),
            noise_generator=self.torch_noise,
        )
        self.statistics: StatisticsRole | None = None
        if isinstance(plan, PrivateMixturePlan):
            self.statistics = StatisticsRole(
                self.x_train,
                plan.statistics,
                model.n_components,
                privacy.slot,
                privacy.cohort,
                seed,
                self.noise_rng,
            )
        self.observe: GradObserver | None = None  # test hook: each step's clipped sum, pre-noise
        self.pre_noise_counts: np.ndarray | None = None  # test hook: the last sum_x r(x)

    def state_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        arrays, metadata = super().state_arrays()
        metadata["ledger"] = json.dumps(self.ledger.to_json(), sort_keys=True)
        if self.statistics is not None:
            arrays.update(self.statistics.state_arrays())
        if self.privacy.noise_seed is not None:
            # Only reproducible test noise is carried over; private noise is never written
            # down, and a restored client draws fresh OS entropy instead.
            metadata["noise_rng"] = json.dumps(self.noise_rng.bit_generator.state)
            arrays["torch_noise"] = self.torch_noise.get_state().numpy()
        return arrays, metadata

    def load_state(self, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
        super().load_state(arrays, metadata)
        ledger = PrivacyLedger.from_json(json.loads(metadata["ledger"]))
        path = self.privacy.ledger_path
        if path is not None and path.exists():
            # The ledger file is written ahead of every release, the state after it: if a
            # process died in between, the file knows of a spend the state does not.
            on_disk = PrivacyLedger.load(path)
            if len(on_disk.entries) >= len(ledger.entries):
                ledger = on_disk
        if ledger.client_id != self.client_id or ledger.budget != self.ledger.budget:
            raise PrivacyError(
                f"{self.client_id}: the saved ledger belongs to {ledger.client_id!r} with budget "
                f"{ledger.budget}; refusing to continue under a different identity or budget"
            )
        self.ledger = ledger
        if self.statistics is not None:
            self.statistics.load_state(arrays)
        if self.privacy.noise_seed is not None and "noise_rng" in metadata:
            self.noise_rng.bit_generator.state = json.loads(metadata["noise_rng"])
            self.torch_noise.set_state(torch.from_numpy(np.asarray(arrays["torch_noise"], dtype=np.uint8)))

    @property
    def identifier(self) -> FineClusterModel | None:
        return self.statistics.state.model if self.statistics is not None else None

    def handle(self, message: Message) -> Message:
        plan = self.privacy.plan
        if not isinstance(plan, PrivateMixturePlan):
            return super().handle(message)
        assert self.statistics is not None
        t, stats_rounds = message.round, plan.statistics.rounds
        expected = downlink_stage(plan.statistics, t) if t <= stats_rounds else BROADCAST
        if message.stage != expected:
            raise ProtocolViolation(
                f"{self.client_id}: round {t} expects stage {expected!r}, got {message.stage!r}"
            )
        if t <= stats_rounds:
            total = None if t == 0 else self.read_vector(message, AGGREGATE_FIELD)
            self.statistics.absorb(t, total)
        else:
            self.load_aggregate(*self.read_aggregate(message))
        self._commit(plan.round_entries(t))
        if t < stats_rounds:
            stage, name, value = self.statistics.contribution(t)
            release = plan.statistics.release_at(t)
            payload = build_payload(
                self.spec.stage(stage),
                self.encode_values({name: value}),
                {name: f"{release}@round{t}"},
                self.key_id,
            )
            return Message(stage=stage, round=t, sender=self.client_id, payload=payload)
        return self.update_message(t, self.vae_round(t, plan))

    def read_vector(self, message: Message, name: str) -> np.ndarray:
        """A flat aggregate from a downlink (decrypted by a client that holds keys)."""
        return payload_array(message, name).astype(np.float64)

    def _commit(self, entries: tuple[LedgerEntry, ...]) -> None:
        """Check, then commit, then persist: all before anything is computed for release."""
        self.ledger = self.ledger.check(entries)
        if self.privacy.ledger_path is not None:
            self.ledger.save(self.privacy.ledger_path)

    def vae_round(self, round_index: int, plan: PrivateMixturePlan) -> np.ndarray:
        """DP-SGD on the VAEs with r(x) = softmax(log pi~ + log P(j(x) | k)): pi~ and the fine
        clusters are released values, j(x) depends on x alone. Returns the weights n~ pi~, a
        function of the released histograms only."""
        assert self.statistics is not None
        grouping, model = self.statistics.state.grouping, self.statistics.state.model
        assert grouping is not None and model is not None
        self.pi = np.maximum(grouping.pi[self.privacy.slot], self.settings.pi_floor)
        self.pi = self.pi / self.pi.sum()
        seed_torch(self.seed, round_index, self.index)
        resp = responsibilities(
            torch.as_tensor(model.log_likelihood(self.x_train), dtype=torch.float32), log_prior(self.pi)
        )
        self._train(resp, plan.steps_per_round)
        return self.pi * max(float(grouping.sizes[self.privacy.slot]), 0.0)

    def _train(self, resp: Tensor, steps: int) -> None:
        x = torch.as_tensor(self.x_train)

        def per_sample_loss(module: nn.Module, batch: Tensor) -> Tensor:
            return mixture_loss(module(x[batch]), resp[batch])

        # A fresh Adam each round, as in the non-private client.
        self.trainer.optimiser.original_optimizer.state.clear()
        # Which records each step samples must stay secret too: subsampling amplification
        # assumes nobody knows whether a given record was drawn.
        step_seed = int(self.noise_rng.integers(2**63))
        self.trainer.train(per_sample_loss, len(x), steps, step_seed, self.observe)

    def local_round(self, round_index: int, temperature: float) -> np.ndarray:
        plan = self.privacy.plan
        assert isinstance(plan, DpPlan)
        self._commit(plan.round_entries(round_index))

        seed_torch(self.seed, round_index, self.index)  # public randomness: the ELBO's latent draws
        s = self.settings
        elbo = e_step_elbo(self.model, self.x_train, s.elbo_samples)
        counts = responsibilities(elbo, log_prior(self.pi), temperature).sum(0).numpy().astype(np.float64)
        self.pre_noise_counts = counts
        # L2 sensitivity 1 under add/remove-one: ||r(x)||_2 <= ||r(x)||_1 = 1.
        noisy = gaussian_release(counts, plan.count_noise_multiplier, 1.0, self.noise_rng)
        self.pi = mixture_estimate(noisy, s.pi_floor)
        self._train(responsibilities(elbo, log_prior(self.pi), temperature), plan.steps_per_round)
        return noisy

    def release_events(self, round_index: int) -> Mapping[str, str]:
        plan = self.privacy.plan
        if isinstance(plan, PrivateMixturePlan):
            # The weights are post-processing of the histogram release.
            counts = f"{HISTOGRAM}@round{plan.statistics.rounds - 1}"
            return {
                "masses": counts,
                "component_index": counts,
                "weighted_components": f"{DPSGD}@round{round_index}",
            }
        counts = f"{COUNTS}@round{round_index}"
        return {
            "masses": counts,
            "component_index": counts,  # which components: a function of the released counts
            "weighted_components": f"{DPSGD}@round{round_index}",
        }
