"""Noise calibration from a whole-run budget: pure functions over dp-accounting's accountant.

Two plans, one per private design, each with the calibration that makes its whole run spend
exactly the budget (kept together, about 320 lines, because they share the search in
`_noise_for` and the ledger entries they promise must stay side by side):
- `DpPlan` (em design): the R count releases alone may spend `count_share` of epsilon; DP-SGD's
  noise is then calibrated so that counts and DP-SGD together spend exactly the budget,
  composed by the PLD accountant (composition is what is bounded, not the shares).
- `PrivateMixturePlan` (statistics design): the statistics phase (`StatisticsPlan`), then DP-SGD.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import dp_accounting
from dp_accounting import mechanism_calibration

from securegmi.config import statistics_sizes
from securegmi.core import fine_clusters as fc
from securegmi.core.source_classifier import parameter_count
from securegmi.errors import ConfigError
from securegmi.privacy.accounting import (
    PRIMARY,
    Accountant,
    PldAccountant,
    epsilon_of,
    epsilon_pld,
    epsilon_rdp,
)
from securegmi.privacy.events import dpsgd_event, gaussian_event
from securegmi.privacy.ledger import LedgerEntry, PrivacyBudget
from securegmi.vocabulary import EventName, Placement, PrivateDesign


@dataclass(frozen=True)
class DpPlan:
    """Everything the ledger will record, decided before the first round."""

    epsilon: float
    delta: float
    rounds: int
    steps_per_round: int
    sample_rate: float
    clip_norm: float
    count_share: float
    sgd_noise_multiplier: float
    count_noise_multiplier: float
    # The accountant the noise was calibrated on: plans written before PLD became the primary
    # figure were calibrated on RDP (`plan_from_dict` reads them so).
    accountant: str = PRIMARY

    def round_entries(self, round_index: int) -> tuple[LedgerEntry, LedgerEntry]:
        """The two releases of one round: the soft counts, and the DP-SGD steps behind the
        uploaded components."""
        return (
            LedgerEntry.of(round_index, EventName.COUNTS, gaussian_event(self.count_noise_multiplier)),
            LedgerEntry.of(
                round_index,
                EventName.DPSGD,
                dpsgd_event(self.sgd_noise_multiplier, self.sample_rate, self.steps_per_round),
            ),
        )

    def planned_epsilon(self, accountant: str = PRIMARY) -> float:
        events = [e.event for r in range(self.rounds) for e in self.round_entries(r)]
        return epsilon_of(events, self.delta, accountant)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Noise multipliers the planner searches between: below 0.05 a Gaussian release is close to
# publishing the value, above 2^20 it carries nothing.
_SIGMA_RANGE = (0.05, 2.0**20)


def _noise_for(events_of: Any, epsilon: float, delta: float, share: float = 1.0) -> float:
    """The noise multiplier at which `events_of(sigma)` spends `epsilon` by the PLD accountant
    (the ledger's primary figure); `share` is the part of the user's budget that `epsilon` is,
    so that an error names the user's figure.

    The least noise of `_SIGMA_RANGE` is checked by RDP, whose epsilon is at least PLD's: a
    subsampled Gaussian's PLD there costs ~20 s."""
    low, high = _SIGMA_RANGE
    asked = epsilon / share
    most = epsilon_pld([events_of(high)], delta) / share
    if most > asked:
        raise ConfigError(
            f"epsilon {asked:g} is too small to plan: even noise multipliers of {high:g} spend "
            f"{most:.3g}. Raise --epsilon (useful runs need about 1 or more)."
        )
    least = epsilon_rdp([events_of(low)], delta) / share  # at least PLD's figure
    if least <= asked:
        raise _too_large(asked, low, least)
    # Halve the noise from the most until PLD overspends: evaluations above the answer are the
    # cheap ones (a PLD's support shrinks as the noise grows).
    upper = high
    while epsilon_pld([events_of(lower := max(low, upper / 2))], delta) <= epsilon:
        if lower == low:  # RDP overspends at the least noise, PLD does not
            raise _too_large(asked, low, epsilon_pld([events_of(low)], delta) / share)
        upper = lower
    # dp-accounting's Brent search checks its root and steps to the safe side itself: PLD spends
    # at most `epsilon` at the noise it returns.
    sigma = mechanism_calibration.calibrate_dp_mechanism(
        PldAccountant,
        events_of,
        epsilon,
        delta,
        mechanism_calibration.ExplicitBracketInterval(lower, upper),
        tol=1e-4,
    )
    return float(sigma)


def _too_large(asked: float, low: float, spent: float) -> ConfigError:
    return ConfigError(
        f"epsilon {asked:g} is too large to mean anything: the least noise the planner uses "
        f"(multiplier {low:g}) already spends at most {spent:.3g}. Use --epsilon "
        f"{spent:.3g} or less (a few to 10 is usual)."
    )


def dp_sgd_noise(budget: PrivacyBudget, *, sample_rate: float, steps: int) -> float:
    """The noise multiplier at which `steps` DP-SGD steps alone spend `budget`."""
    return _noise_for(lambda s: dpsgd_event(s, sample_rate, steps), budget.epsilon, budget.delta)


def calibrate(
    budget: PrivacyBudget,
    *,
    rounds: int,
    steps_per_round: int,
    sample_rate: float,
    clip_norm: float = 1.0,
    count_share: float = 0.2,
) -> DpPlan:
    """Noise multipliers that make `rounds` rounds spend at most `budget`."""
    if rounds < 1 or steps_per_round < 1:
        raise ConfigError("a DP plan needs at least one round and one DP-SGD step per round")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not 0 < count_share < 1:
        raise ConfigError(f"count_share must be in (0, 1), got {count_share}")
    count_sigma = _noise_for(
        lambda s: dp_accounting.SelfComposedDpEvent(gaussian_event(s), rounds),
        budget.epsilon * count_share,
        budget.delta,
        count_share,
    )
    sgd_sigma = _noise_for(
        lambda s: dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(gaussian_event(count_sigma), rounds),
                dpsgd_event(s, sample_rate, steps_per_round * rounds),
            ]
        ),
        budget.epsilon,
        budget.delta,
    )
    return DpPlan(
        epsilon=budget.epsilon,
        delta=budget.delta,
        rounds=rounds,
        steps_per_round=steps_per_round,
        sample_rate=sample_rate,
        clip_norm=clip_norm,
        count_share=count_share,
        sgd_noise_multiplier=sgd_sigma,
        count_noise_multiplier=count_sigma,
    )


def check_delta(delta: float, records: int) -> None:
    """`ConfigError` unless delta is well below 1/n for a client of `records` records."""
    if delta >= 0.1 / max(records, 1):
        # delta bounds the probability of an outright failure of the guarantee: at delta near
        # 1/n a mechanism may publish one of a client's n records (Dwork & Roth 2014, §2.3).
        # The message states the rule, never the client's size nor a figure derived from it:
        # how many records a client holds is its own (private) business.
        raise ConfigError(
            f"delta {delta:g} is not well below 1/n for the largest client (n its number of "
            "records, not printed here: a client's size is private): it would allow releasing a "
            "record outright. Use a smaller delta (--delta), below 0.1/n: 1e-5 suits clients of up "
            "to 10,000 records, 1e-6 up to 100,000."
        )


@dataclass(frozen=True)
class StatisticsPlan:
    """The DP statistics phase that identifies the components before any DP-SGD.

    Round 0 releases the moments of the records on the unit sphere (for a projection), rounds
    1..I release per-fine-cluster sums and counts (DP k-means), round I+1 each client's
    histogram over the fine clusters. Every release is one Gaussian mechanism on a sum of
    per-record contributions of bounded L2 norm (`securegmi.core.fine_clusters`).

    Noise placement: `sigma = noise_multiplier * sensitivity` is the noise the *aggregate* must
    carry. Under "local" every client adds all of it to its own upload. Under "split" (only
    with CKKS, where nothing but the sum is ever decrypted) each client adds a share of standard
    deviation sigma * `split_share(min_clients)` (`split_share`: any min_clients - 1 shares carry
    the full noise, since every client knows its own share and can subtract it from the sum it
    decrypts). Against the server and any one other client the release is then the Gaussian
    mechanism at `noise_multiplier` or better; against the server colluding with one client
    (shared key: it decrypts one upload) it is the Gaussian mechanism at noise_multiplier *
    split_share(min_clients): the ledger's fallback figure. The histogram is one client's own
    row, so it always carries the full noise.
    """

    clusters: int
    projection_dim: int
    iterations: int
    centre: float
    sketch_dim: int  # records are sketched to this many dimensions first (public, seeded)
    sketch_seed: int
    placement: str  # "split" | "local"
    min_clients: int
    moments_noise: float
    cluster_noise: float
    histogram_noise: float
    # The weights of the moments release's count, sum and second moments
    # (`core.fine_clusters.MOMENTS_WEIGHTS`); plans written before them read as unweighted.
    moments_weights: tuple[float, float, float] = fc.UNWEIGHTED_MOMENTS

    def __post_init__(self) -> None:
        # JSON gives a list; a plan is frozen and compared, so hold a tuple of floats.
        weights = tuple(self.moments_weights) if isinstance(self.moments_weights, (list, tuple)) else ()
        fc.check_moments_weights(weights)  # before float(): "1" or True are not weights
        object.__setattr__(self, "moments_weights", tuple(float(w) for w in weights))

    @property
    def rounds(self) -> int:
        return self.iterations + 2

    def release_at(self, round_index: int) -> EventName:
        """Which release of the statistics phase (DESIGN §2) round `round_index` makes."""
        if round_index == 0:
            return EventName.MOMENTS
        return EventName.CLUSTERS if round_index <= self.iterations else EventName.HISTOGRAM

    def share_scale(self, release: EventName) -> float:
        """The fraction of the aggregate's noise standard deviation each client adds."""
        if release == EventName.HISTOGRAM or self.placement == Placement.LOCAL:
            return 1.0
        return split_share(self.min_clients)

    def noise_multiplier(self, release: EventName) -> float:
        noise = {
            EventName.MOMENTS: self.moments_noise,
            EventName.CLUSTERS: self.cluster_noise,
            EventName.HISTOGRAM: self.histogram_noise,
        }
        return noise[release]

    def entry(self, round_index: int) -> LedgerEntry:
        release = self.release_at(round_index)
        sigma = self.noise_multiplier(release)
        fallback = gaussian_event(sigma * self.share_scale(release))
        return LedgerEntry.of(round_index, release, gaussian_event(sigma), fallback)


def split_share(min_clients: int) -> float:
    """Each client's fraction of a split release's noise standard deviation.

    A client decrypts the sum and knows its own share, so what it sees of another's record is
    masked by the other m - 1 shares only: with shares s sigma, (m - 1) s^2 >= 1 for every
    m >= min_clients needs s = 1 / sqrt(min_clients - 1). (With s = 1 / sqrt(min_clients) a
    single curious client would face sigma sqrt((N - 1) / N): epsilon 4.43 where 4 was claimed
    for 4 clients.) The sum then carries variance m / (min_clients - 1) sigma^2, a little more
    than one curator's. One client alone holds the whole noise.
    """
    return 1.0 / math.sqrt(max(min_clients - 1, 1))


def statistics_noise(
    sigma_total: float, iterations: int, shares: tuple[float, float, float]
) -> tuple[float, float, float]:
    """Noise multipliers of the moments, each cluster release and the histogram, given the
    noise multiplier `sigma_total` of one Gaussian mechanism equivalent to their composition.

    Gaussian mechanisms compose like one with 1/sigma^2 = sum_i 1/sigma_i^2 (Dong, Roth & Su,
    "Gaussian differential privacy", 2022, Cor. 3.3), so share s_i of 1/sigma_total^2 spread
    over n_i releases gives sigma_i = sigma_total sqrt(n_i / s_i)."""
    s_m, s_c, s_h = shares
    return (
        sigma_total / math.sqrt(s_m),
        sigma_total * math.sqrt(iterations / s_c),
        sigma_total / math.sqrt(s_h),
    )


@dataclass(frozen=True)
class PrivateMixturePlan:
    """The whole private run: the statistics phase, then `vae_rounds` rounds of DP-SGD on the
    VAEs with responsibilities from the released statistics only.

    `sgd_placement` "local": each VAE round is `steps_per_round` DP-SGD steps on one client's
    records, each step's sum carrying the full noise. "split": one round per step; each client
    adds noise of standard deviation sigma C split_share(min_clients) to its clipped gradient
    sum and only the CKKS sum over at least `min_clients` clients is decrypted, so the sum, less
    any one client's own share, carries the full noise, as one curator's step over the pooled
    Poisson sample would (the statistics' split noise, `StatisticsPlan`, applied to DP-SGD).
    Either way the ledger records the same subsampled Gaussian steps; against the server
    colluding with one client a split step is one at noise multiplier sigma *
    split_share(min_clients) (the fallback event).
    """

    epsilon: float
    delta: float
    statistics: StatisticsPlan
    vae_rounds: int
    steps_per_round: int
    sample_rate: float
    clip_norm: float
    statistics_share: float
    sgd_noise_multiplier: float
    sgd_placement: str = Placement.LOCAL
    accountant: str = PRIMARY  # as `DpPlan.accountant`
    # The source classifier distilled from the statistics (core.source_classifier): this many
    # full-batch DP-SGD steps, one round each, between the statistics and the VAEs, on a
    # classifier of `identifier_hidden` hidden units. Plans written before it have none.
    identifier_steps: int = 0
    identifier_hidden: int = 0
    identifier_noise_multiplier: float = 0.0
    identifier_share: float = 0.0  # of the statistics' share of epsilon

    def __post_init__(self) -> None:
        counts = (self.identifier_steps, self.identifier_hidden)
        whole = all(isinstance(v, int) and not isinstance(v, bool) for v in counts)
        if not whole or self.identifier_steps < 0:
            raise ConfigError(
                f"a source classifier's steps and hidden units must be whole numbers, got {counts}"
            )
        if self.identifier_steps and not (
            self.identifier_hidden >= 1
            and 0 < self.identifier_share < 1
            and self.identifier_noise_multiplier > 0
        ):
            raise ConfigError(
                f"a source classifier of {self.identifier_steps} steps needs hidden units >= 1, a share in "
                f"(0, 1) and a positive noise multiplier, got {self.identifier_hidden}, "
                f"{self.identifier_share} and {self.identifier_noise_multiplier}"
            )

    @property
    def split_sgd(self) -> bool:
        return self.sgd_placement == Placement.SPLIT

    @property
    def identifier_rounds(self) -> range:
        """The rounds that step the source classifier (empty without one)."""
        first = self.statistics.rounds
        return range(first, first + self.identifier_steps)

    def identifier_size(self, components: int) -> int:
        """The classifier's parameter count (the size of each of its gradient releases)."""
        return parameter_count(self.statistics.sketch_dim, self.identifier_hidden, components)

    @property
    def rounds(self) -> int:
        steps = self.vae_rounds * self.steps_per_round if self.split_sgd else self.vae_rounds
        return self.statistics.rounds + self.identifier_steps + steps

    @property
    def sgd_share_scale(self) -> float:
        """The fraction of a step's noise standard deviation each client adds."""
        return split_share(self.statistics.min_clients) if self.split_sgd else 1.0

    def round_entries(self, round_index: int) -> tuple[LedgerEntry, ...]:
        if round_index < self.statistics.rounds:
            return (self.statistics.entry(round_index),)
        if round_index in self.identifier_rounds:
            # Full batch: every record in every step, so each is a Gaussian mechanism on the
            # clipped gradient sum (sensitivity the clipping norm), split as the VAEs' steps are.
            sigma = self.identifier_noise_multiplier
            fallback = dpsgd_event(sigma * self.sgd_share_scale, 1.0, 1) if self.split_sgd else None
            return (LedgerEntry.of(round_index, EventName.DPSGD, dpsgd_event(sigma, 1.0, 1), fallback),)
        sigma, q = self.sgd_noise_multiplier, self.sample_rate
        if self.split_sgd:
            fallback = dpsgd_event(sigma * self.sgd_share_scale, q, 1)
            return (LedgerEntry.of(round_index, EventName.DPSGD, dpsgd_event(sigma, q, 1), fallback),)
        return (LedgerEntry.of(round_index, EventName.DPSGD, dpsgd_event(sigma, q, self.steps_per_round)),)

    def planned_epsilon(self, accountant: str = PRIMARY) -> float:
        events = [e.event for r in range(self.rounds) for e in self.round_entries(r)]
        return epsilon_of(events, self.delta, accountant)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": str(PrivateDesign.STATISTICS)}


STATISTICS_SHARES = (0.25, 0.45, 0.30)  # moments, clusters, histogram: tuned on seeds 10-17


def calibrate_private_mixture(
    budget: PrivacyBudget,
    *,
    statistics: StatisticsPlan,
    vae_rounds: int,
    steps_per_round: int,
    sample_rate: float,
    clip_norm: float,
    statistics_share: float,
    sgd_placement: str = Placement.LOCAL,
    shares: tuple[float, float, float] = STATISTICS_SHARES,
    identifier_steps: int = 0,
    identifier_hidden: int = 0,
    identifier_share: float = 0.0,
) -> PrivateMixturePlan:
    """The identification (the statistics, then the source classifier's `identifier_steps`
    where there are any) may spend `statistics_share` of epsilon, the statistics alone
    (1 - `identifier_share`) of that; DP-SGD's noise on the VAEs then makes the whole
    composition spend exactly the budget (PLD accountant)."""
    if vae_rounds < 1 or steps_per_round < 1:
        raise ConfigError("a private plan needs at least one DP-SGD round of at least one step")
    if not 0 < statistics_share < 1:
        raise ConfigError(f"statistics_share must be in (0, 1), got {statistics_share}")
    if identifier_steps and not 0 < identifier_share < 1:
        raise ConfigError(f"identifier_share must be in (0, 1), got {identifier_share}")
    share = statistics_share * (1 - identifier_share) if identifier_steps else statistics_share
    sigma_total = _noise_for(gaussian_event, budget.epsilon * share, budget.delta, share)
    m, c, h = statistics_noise(sigma_total, statistics.iterations, shares)
    stats = replace(statistics, moments_noise=m, cluster_noise=c, histogram_noise=h)
    identification = [stats.entry(r).event for r in range(stats.rounds)]
    identifier_sigma = 0.0
    if identifier_steps:
        identifier_sigma = _noise_for(
            lambda s: dp_accounting.ComposedDpEvent([*identification, dpsgd_event(s, 1.0, identifier_steps)]),
            budget.epsilon * statistics_share,
            budget.delta,
            statistics_share,
        )
        identification.append(dpsgd_event(identifier_sigma, 1.0, identifier_steps))
    sgd_sigma = _noise_for(
        lambda s: dp_accounting.ComposedDpEvent(
            [*identification, dpsgd_event(s, sample_rate, steps_per_round * vae_rounds)]
        ),
        budget.epsilon,
        budget.delta,
    )
    return PrivateMixturePlan(
        budget.epsilon,
        budget.delta,
        stats,
        vae_rounds,
        steps_per_round,
        sample_rate,
        clip_norm,
        statistics_share,
        sgd_sigma,
        sgd_placement,
        identifier_steps=identifier_steps,
        identifier_hidden=identifier_hidden if identifier_steps else 0,
        identifier_noise_multiplier=identifier_sigma,
        identifier_share=identifier_share if identifier_steps else 0.0,
    )


# The distilled source classifier's defaults (bench/results/tuning.md#source-classifier).
IDENTIFIER_HIDDEN = 32
IDENTIFIER_SHARE = 0.15
SKETCH_DIM = 64  # records are sketched to at most this many dimensions (core.fine_clusters.public_sketch)


def calibrate_statistics(
    budget: PrivacyBudget,
    *,
    clients: int,
    features: int,
    likelihood: str = "bernoulli",
    vae_rounds: int = 1,
    local_epochs: int = 5,
    sample_rate: float = 1.0,
    clip_norm: float = 1.0,
    placement: str = Placement.LOCAL,
    sgd_placement: str | None = None,
    min_clients: int | None = None,
    fine_clusters: int | None = None,
    projection_dim: int | None = None,
    kmeans_iterations: int | None = None,
    statistics_share: float = 0.9,
    identifier_steps: int = 0,
    identifier_hidden: int = IDENTIFIER_HIDDEN,
    identifier_share: float = IDENTIFIER_SHARE,
    seed: int = 0,
) -> PrivateMixturePlan:
    """The default private design's plan (the statistics design) from the budget and public
    sizes only: the cohort size `clients`, the `features` per record and the decoder's
    `likelihood` ("bernoulli" for intensities in [0, 1], else "gaussian"); never from the
    records (Papernot & Steinke, ICLR 2022). Each VAE round is `local_epochs` passes of DP-SGD
    at Poisson rate `sample_rate` (default 1: full-batch DP gradient descent, a few large steps;
    bench/results/tuning.md#private-densities). `placement`/`sgd_placement` "split" (the
    `secure` protocol only) let each client add a share of the noise (`sgd_placement` defaults
    to `placement`); `min_clients` (default: every client) is
    the fewest releases an aggregate may sum. `identifier_steps` > 0 distils a source classifier
    of `identifier_hidden` units from the statistics in that many full-batch DP-SGD steps, on
    `identifier_share` of the identification's budget. The statistics' sizes (`fine_clusters`,
    `projection_dim`, `kmeans_iterations`) left out are chosen by epsilon
    (`securegmi.config.statistics_sizes`). Bind the protocol with
    `securegmi.bind_protocol(name, components, plan=plan, clients=clients)`."""
    for name, value in (("clients", clients), ("features", features), ("local_epochs", local_epochs)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
    sgd_placement = placement if sgd_placement is None else sgd_placement
    for name, where in (("placement", placement), ("sgd_placement", sgd_placement)):
        if where not in tuple(Placement):
            raise ConfigError(f"{name} must be one of {tuple(map(str, Placement))}, got {where!r}")
    cohort = clients if min_clients is None else min_clients
    if not 1 <= cohort <= clients:
        raise ConfigError(f"min_clients must be between 1 and the {clients} clients, got {min_clients}")
    sizes = statistics_sizes(budget.epsilon)
    statistics = StatisticsPlan(
        clusters=sizes.fine_clusters if fine_clusters is None else fine_clusters,
        projection_dim=min(
            sizes.projection_dim if projection_dim is None else projection_dim, features, SKETCH_DIM
        ),
        iterations=sizes.kmeans_iterations if kmeans_iterations is None else kmeans_iterations,
        # A public centre for the unit-sphere map: mid-range of [0, 1] intensities, the origin
        # for standardised (Gaussian-likelihood) data.
        centre=0.5 if likelihood == "bernoulli" else 0.0,
        sketch_dim=min(features, SKETCH_DIM),
        sketch_seed=seed,
        placement=placement,
        min_clients=cohort,
        moments_noise=0.0,
        cluster_noise=0.0,
        histogram_noise=0.0,
        moments_weights=fc.MOMENTS_WEIGHTS,
    )
    return calibrate_private_mixture(
        budget,
        statistics=statistics,
        vae_rounds=vae_rounds,
        steps_per_round=sgd_steps(local_epochs, sample_rate),
        sgd_placement=sgd_placement,
        sample_rate=sample_rate,
        clip_norm=clip_norm,
        statistics_share=statistics_share,
        identifier_steps=identifier_steps,
        identifier_hidden=identifier_hidden,
        identifier_share=identifier_share,
    )


def sgd_steps(local_epochs: int, sample_rate: float) -> int:
    """DP-SGD steps in `local_epochs` passes at Poisson rate q: 1/q steps a pass."""
    return local_epochs * max(1, round(1.0 / sample_rate))


def plan_from_dict(d: dict[str, Any]) -> DpPlan | PrivateMixturePlan:
    """The plan a run wrote with `to_dict` (dp_plan.json), for the audit to check ledgers against."""
    if not isinstance(d, dict):
        raise ConfigError(f"not a privacy plan written by securegmi: a {type(d).__name__}, not an object")
    if not_finite := sorted(_non_finite(d)):
        # JSON as Python reads it admits NaN: a NaN noise multiplier once made a forged plan's
        # Gaussians cost nothing (a review). No plan securegmi calibrates holds one.
        raise ConfigError(f"not a privacy plan written by securegmi: {', '.join(not_finite)} not finite")
    try:
        # A plan written before it recorded its accountant was calibrated on RDP.
        fields = {"accountant": Accountant.RDP} | {k: v for k, v in d.items() if k != "kind"}
        if fields["accountant"] not in tuple(Accountant):
            raise ConfigError(
                f"not a privacy plan written by securegmi: unknown accountant {fields['accountant']!r} "
                f"(securegmi calibrates on one of {tuple(map(str, Accountant))})"
            )
        if d.get("kind") == PrivateDesign.STATISTICS:
            return PrivateMixturePlan(**{**fields, "statistics": StatisticsPlan(**fields["statistics"])})
        return DpPlan(**fields)
    except (TypeError, KeyError, AttributeError) as exc:  # a field of the wrong type, say
        raise ConfigError(f"not a privacy plan written by securegmi: {exc}") from exc


def _non_finite(d: dict[str, Any], prefix: str = "") -> list[str]:
    """The names of the numbers in a plan's JSON that are NaN or infinite."""
    out = []
    for key, value in d.items():
        if isinstance(value, dict):
            out += _non_finite(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(f"{prefix}{key}")
    return out
