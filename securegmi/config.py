"""Run configuration: frozen dataclasses validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from types import UnionType
from typing import Any, NamedTuple, Union, get_args, get_origin, get_type_hints

from securegmi.errors import ConfigError
from securegmi.vocabulary import Placement, PrivateDesign

METHODS: tuple[str, ...] = (
    "fedgmi",
    "local",
    "fedem-weights",
    "fedavg",
    "ifca",
    "fedgmm",
    "central-em",
    "oracle",
    "central-dp",
)
# OWN_DATA marks the record of a run of the user's own components and records (`securegmi.save`):
# its config.json holds that run's public settings, and no simulated study can be run from it.
OWN_DATA = "own"
DATASETS: tuple[str, ...] = ("digits", "synthetic", "mnist5k")
SOURCE_KINDS: tuple[str, ...] = ("class-groups", "transforms")

# Initial likelihood temperature by dataset: it must grow with the data dimension, since ELBO
# gaps grow with it (docs/design.md §1: about 10 for 64-d digits, a few hundred for 784-d MNIST).
DEFAULT_TEMPERATURE = {"digits": 10.0, "synthetic": 10.0, "mnist5k": 300.0}
# Adam's step size for non-private training, by dataset: a larger step on digits makes more
# progress per round while the split forms (figures: bench/results/tuning.md#learning-rate);
# the other sets keep the step their figures were measured with. DP-SGD has its own
# (`dp_learning_rate`).
DEFAULT_LEARNING_RATE = {"digits": 3e-3, "synthetic": 2e-3, "mnist5k": 2e-3}
# The source classifier's full-batch DP-SGD steps (bench/results/tuning.md#source-classifier).
IDENTIFIER_STEPS = 40


class StatisticsSizes(NamedTuple):
    fine_clusters: int
    projection_dim: int
    kmeans_iterations: int


# The statistics design's sizes by budget: (smallest epsilon, sizes), ascending. Less budget buys
# fewer, coarser statistics, each less noisy: at epsilon 1 every release of 20 clusters in 10
# dimensions is mostly noise (bench/results/tuning.md#sizes-by-epsilon). A function of epsilon
# alone, so choosing by it reveals nothing of the records (Papernot & Steinke, ICLR 2022).
STATISTICS_SIZES: tuple[tuple[float, StatisticsSizes], ...] = (
    (0.0, StatisticsSizes(10, 5, 2)),
    (3.0, StatisticsSizes(16, 8, 3)),
    (6.0, StatisticsSizes(20, 10, 4)),
)


def statistics_sizes(epsilon: float) -> StatisticsSizes:
    """The statistics design's default fine clusters, projection dimensions and k-means rounds
    for a run of budget `epsilon` (STATISTICS_SIZES)."""
    return [sizes for least, sizes in STATISTICS_SIZES if epsilon >= least][-1]


# The fields that hold a vocabulary's names (securegmi.vocabulary), and which vocabulary.
_VOCABULARIES: dict[str, type[StrEnum]] = {
    "private_training": PrivateDesign,
    "noise_placement": Placement,
    "sgd_placement": Placement,
}


def _option(name: str) -> str:
    """The `securegmi simulate` option that sets field `name`."""
    return name.replace("_", "-")


def _of_type(value: object, hint: Any) -> bool:
    """Whether a JSON value fits a field's annotation (str, int, float, or one of them | None);
    a bool is not a number here, an int is a float."""
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return True
        named = option is str or (isinstance(option, type) and issubclass(option, StrEnum))
        if named and isinstance(value, str):
            return True
        if option in (int, float) and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option is float and isinstance(value, float):
            return True
    return False


def _type_name(hint: Any) -> str:
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    return " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{name} {rule}, got {value!r}")


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that determines a simulated run; equal configs give equal runs."""

    dataset: str = "digits"
    sources: str = "class-groups"
    n_sources: int = 3
    clients: int = 20
    components: int = 3
    alpha: float = 0.5
    rounds: int = 60
    local_epochs: int = 5
    method: str = "fedgmi"
    top_b: int | None = None
    seed: int = 0
    batch_size: int = 32
    learning_rate: float | None = None  # Adam's, non-private training; None: the dataset's default
    hidden: int = 128
    latent: int = 8
    temperature: float | None = None  # initial T0; None: the dataset's default
    anneal_fraction: float = 0.5
    e_step_iterations: int = 10
    elbo_samples: int = 4
    pi_floor: float = 1e-3
    test_fraction: float = 0.2
    samples_per_client: int | None = None
    protocol: str = "plain"
    # Differential privacy (protocol "dp"): the whole run's budget per client, and DP-SGD's
    # public sampling: Poisson rate q, clipping norm, and the public divisor of the noisy sum.
    epsilon: float | None = None
    delta: float = 1e-5
    clip_norm: float = 1.0
    # Full-batch DP gradient descent by default: with split noise every step is one encrypted
    # round, and a few large steps on the pooled records reach the VAEs' central-DP density in
    # a fraction of the rounds small Poisson batches take (bench/results/tuning.md#private-densities).
    sample_rate: float = 1.0
    dp_batch_normaliser: float = 16.0
    # Adam's step size on DP-SGD's noisy gradients (every private run, and central-dp): tuned
    # apart from `learning_rate`, as noise changes what step size pays (few steps, large ones;
    # the default of a private `Client` built without settings, federation.local.DP_LEARNING_RATE).
    dp_learning_rate: float = 0.05
    count_share: float = 0.2
    # "private": DP noise and sampling from OS entropy. "seeded": reproducible from `seed`, for
    # tests only; anyone holding config.json could then subtract the noise (the audit fails it).
    dp_noise: str = "private"
    # How a private run finds its components (docs/design.md §2). "statistics": DP statistics (moments,
    # DP k-means into fine clusters, one histogram per client, a rank-K factorisation) identify
    # the components and each client's pi, then `vae_rounds` rounds of DP-SGD fit the VAEs'
    # densities with responsibilities from released values only. "em": the earlier design,
    # DP-SGD EM with soft counts released every round (kept as the reference it is measured
    # against: it collapses onto one component at ~60 records per client).
    private_training: PrivateDesign = PrivateDesign.STATISTICS
    # "split": each client adds a share of the noise and only the CKKS sum is decrypted (secure
    # protocol only); "local": every upload carries the full noise. None: split under secure.
    noise_placement: Placement | None = None
    min_clients: int | None = None  # the smallest cohort a round may complete with; None: all
    statistics_share: float = 0.9  # of epsilon, for the identification (statistics, classifier)
    # The statistics' sizes; None: by epsilon (statistics_sizes).
    fine_clusters: int | None = None
    projection_dim: int | None = None
    kmeans_iterations: int | None = None
    vae_rounds: int = 1
    # Where DP-SGD's noise sits under the statistics design. "local": each client takes
    # `local_epochs` epochs of its own DP-SGD steps per VAE round, every upload carrying the full
    # noise, and the server averages the components. "split" (secure only): one round per step;
    # each client sends its clipped gradient sum plus a share of the noise, encrypted, and every
    # client takes the same step with the decrypted sum, as one curator would. None: the
    # statistics' placement (split under secure).
    sgd_placement: Placement | None = None
    # Full-batch DP-SGD steps that distil a source classifier from the statistics' released
    # responsibilities (core.source_classifier), between the statistics and the VAEs, on
    # `identifier_share` of the statistics' share of epsilon. None: 40 where DP-SGD's noise is
    # split (the default under secure) and for central-dp, none under local noise (each client's
    # gradient would carry the whole noise); 0: no classifier.
    identifier_steps: int | None = None
    identifier_share: float = 0.15

    def __post_init__(self) -> None:
        # A name given as its string (the CLI's options, a config.json) becomes its member, so
        # that a misspelt one is refused here with the names that are valid.
        for name, vocabulary in _VOCABULARIES.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, vocabulary):
                _check(
                    value in tuple(vocabulary), name, f"must be one of {tuple(map(str, vocabulary))}", value
                )
                object.__setattr__(self, name, vocabulary(value))
        _check(self.dataset in (*DATASETS, OWN_DATA), "dataset", f"must be one of {DATASETS}", self.dataset)
        _check(self.sources in SOURCE_KINDS, "sources", f"must be one of {SOURCE_KINDS}", self.sources)
        _check(self.method in METHODS, "method", f"must be one of {METHODS}", self.method)
        for name in (
            "n_sources",
            "clients",
            "components",
            "rounds",
            "local_epochs",
            "batch_size",
            "hidden",
            "latent",
            "e_step_iterations",
            "elbo_samples",
        ):
            _check(getattr(self, name) >= 1, name, "must be at least 1", getattr(self, name))
        _check(self.alpha > 0, "alpha", "must be positive", self.alpha)
        if self.learning_rate is not None:
            _check(self.learning_rate > 0, "learning_rate", "must be positive", self.learning_rate)
        _check(self.dp_learning_rate > 0, "dp_learning_rate", "must be positive", self.dp_learning_rate)
        _check(0 < self.anneal_fraction <= 1, "anneal_fraction", "must be in (0, 1]", self.anneal_fraction)
        _check(
            0 < self.pi_floor < 1 / self.components, "pi_floor", "must be in (0, 1/components)", self.pi_floor
        )
        _check(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)", self.test_fraction)
        _check(self.seed >= 0, "seed", "must be non-negative", self.seed)
        if self.method == "oracle":
            _check(
                self.components == self.n_sources,
                "components",
                f"must equal n_sources ({self.n_sources}): the oracle trains component k on source k",
                self.components,
            )
        if self.temperature is not None:
            _check(self.temperature >= 1, "temperature", "must be at least 1", self.temperature)
        if self.top_b is not None:
            _check(
                1 <= self.top_b <= self.components, "top_b", f"must be in [1, {self.components}]", self.top_b
            )
            _check(
                self.method in ("fedgmi", "fedem-weights"),
                "top_b",
                "applies to fedgmi and fedem-weights only",
                self.method,
            )
        self._check_privacy()
        self._check_applicable()
        if self.samples_per_client is not None:
            _check(
                self.samples_per_client >= 10,
                "samples_per_client",
                "must be at least 10",
                self.samples_per_client,
            )

    def _check_privacy(self) -> None:
        private = self.protocol in ("dp", "secure")
        if private and self.epsilon is None:
            raise ConfigError(
                f"protocol {self.protocol!r} needs a budget: pass --epsilon (and optionally --delta)"
            )
        if self.method == "central-dp" and self.epsilon is None:
            raise ConfigError("central-dp is the central DP reference: pass --epsilon")
        if self.epsilon is None:
            return
        if self.method == "central-dp":
            self._check_central()
        else:
            _check(private, "protocol", "must be 'dp' or 'secure' when --epsilon is given", self.protocol)
        if self.protocol == "secure" and self.top_b is not None:
            raise ConfigError("--top-b needs cleartext component indices; use protocol 'dp' for it")
        _check(0 < self.epsilon < float("inf"), "epsilon", "must be positive and finite", self.epsilon)
        _check(0 < self.delta < 1, "delta", "must be in (0, 1)", self.delta)
        _check(self.clip_norm > 0, "clip_norm", "must be positive", self.clip_norm)
        _check(0 < self.sample_rate <= 1, "sample_rate", "must be in (0, 1]", self.sample_rate)
        _check(
            self.dp_batch_normaliser > 0, "dp_batch_normaliser", "must be positive", self.dp_batch_normaliser
        )
        _check(0 < self.count_share < 1, "count_share", "must be in (0, 1)", self.count_share)
        _check(
            self.dp_noise in ("private", "seeded"), "dp_noise", "must be 'private' or 'seeded'", self.dp_noise
        )
        if self.noise_placement is not None:
            if self.noise_placement == Placement.SPLIT and self.protocol != "secure":
                raise ConfigError(
                    "split noise is sound only when nothing but the encrypted sum is ever decrypted: "
                    "use --protocol secure, or --noise-placement local"
                )
            if self.noise_placement == Placement.SPLIT and self.private_training != PrivateDesign.STATISTICS:
                raise ConfigError(
                    "split noise needs one noisy release per aggregation; the em design takes many "
                    "local DP-SGD steps per upload: use --noise-placement local with it"
                )
        if self.sgd_placement == Placement.SPLIT and (
            self.protocol != "secure" or self.private_training != PrivateDesign.STATISTICS
        ):
            raise ConfigError(
                "split DP-SGD noise is sound only when nothing but the encrypted sum of the gradients is "
                "decrypted, under the statistics design: use --protocol secure --private-training "
                "statistics, or --sgd-placement local"
            )
        if self.min_clients is not None:
            _check(
                1 <= self.min_clients <= self.clients,
                "min_clients",
                f"must be in [1, {self.clients}]",
                self.min_clients,
            )
        _check(0 < self.statistics_share < 1, "statistics_share", "must be in (0, 1)", self.statistics_share)
        _check(0 < self.identifier_share < 1, "identifier_share", "must be in (0, 1)", self.identifier_share)
        if self.identifier_steps is not None:
            _check(self.identifier_steps >= 0, "identifier_steps", "must be 0 or more", self.identifier_steps)
        for name in ("fine_clusters", "projection_dim", "kmeans_iterations", "vae_rounds"):
            if getattr(self, name) is not None:
                _check(getattr(self, name) >= 1, name, "must be at least 1", getattr(self, name))
        if self.method in ("local", "central-em", "oracle"):
            raise ConfigError(f"method {self.method} sends nothing, so --epsilon does not apply to it")
        if self.method in ("ifca", "fedgmm"):
            raise ConfigError(
                f"method {self.method} is a non-private peer for comparison; under --epsilon use fedgmi"
            )
        if self.method == "fedem-weights":
            raise ConfigError(
                "fedem-weights weights components by each client's raw sample count, which is not "
                "released with DP; under --epsilon use fedgmi (weights are the DP counts)"
            )

    def _check_central(self) -> None:
        """central-dp is one trusted curator over the pooled records: it sends no message and adds
        each noise once, so the settings of a federation's messages and noise shares do not apply."""
        _check(
            self.private_training == PrivateDesign.STATISTICS,
            "private_training",
            "must be 'statistics' for central-dp, the central reference of the statistics design",
            self.private_training,
        )
        for name, default in (("protocol", "plain"), ("noise_placement", None), ("min_clients", None)):
            if getattr(self, name) != default:
                raise ConfigError(
                    f"--{_option(name)} does not apply to central-dp: one trusted curator pools the "
                    "records, sends no message and adds each noise once; leave it out"
                )
        if self.sgd_placement is not None:
            raise ConfigError(
                "--sgd-placement does not apply to central-dp: its curator takes every DP-SGD step "
                "on the pooled records; leave it out"
            )

    def _check_applicable(self) -> None:
        """A setting this run would not use is refused rather than written to config.json and
        ignored. Only a value other than the default can be told apart: every field has a
        default, and every config.json (written by any earlier version too) carries all of them."""
        default = {f.name: f.default for f in fields(self)}

        def refuse(name: str, applies: bool, why: str) -> None:
            if not applies and getattr(self, name) != default[name]:
                raise ConfigError(f"--{_option(name)} {why}")

        if self.statistics_design:
            alternative = "" if self.method == "central-dp" else ", or --private-training em for DP-SGD EM"
            statistics_rounds = self.statistics_sizes.kmeans_iterations + 2
            refuse(
                "rounds",
                False,
                "does not apply under the statistics design (the default with --epsilon): its run is "
                f"{statistics_rounds} rounds of DP statistics, then --vae-rounds rounds of "
                f"DP-SGD; set --vae-rounds{alternative}",
            )
        refuse(
            "vae_rounds",
            self.statistics_design,
            "applies under the statistics design only (--epsilon, with --private-training statistics); "
            "this run's length is --rounds",
        )
        refuse("temperature", self.tempered, f"does not apply here: {self._untempered_reason()}")
        for name in ("delta", "private_training", "noise_placement", "sgd_placement", "min_clients"):
            refuse(name, self.epsilon is not None, "applies to a private run only: pass --epsilon with it")
        refuse(
            "identifier_steps",
            self.distils_identifier or self.identifier_steps == 0,
            "applies where DP-SGD's noise is split (--protocol secure, the default there) or to central-dp: "
            "under local noise each client's classifier gradient would carry the whole noise",
        )
        refuse(
            "identifier_share",
            self.planned_identifier_steps > 0,
            "applies only where a source classifier is distilled (--identifier-steps above 0)",
        )
        refuse(
            "min_clients",
            self.statistics_design,
            "applies under the statistics design only: the em design's rounds take no minimum cohort",
        )
        refuse(
            "components",
            self.method != "fedavg",
            "does not apply to fedavg, which trains one shared VAE (pick another method for K components)",
        )
        refuse(
            "local_epochs",
            self.method != "fedgmm",
            "does not apply to fedgmm, which fits Gaussian components from moments with no local training",
        )

    @property
    def tempered(self) -> bool:
        """Whether the run's E-steps anneal a likelihood temperature (--temperature)."""
        return not self.statistics_design and self.method not in ("oracle", "fedgmm", "ifca", "fedavg")

    def _untempered_reason(self) -> str:
        if self.statistics_design:
            return (
                "under the statistics design responsibilities come from the released statistics, "
                "not from tempered ELBOs"
            )
        return {
            "oracle": "oracle trains component k on source k, with no E-step",
            "fedgmm": "fedgmm's E-steps on its Gaussians run at temperature 1",
            "ifca": "each ifca client takes the one cluster with the best mean ELBO",
            "fedavg": "fedavg's one component takes every record",
        }.get(self.method, "")

    @property
    def placement(self) -> Placement:
        """Where DP noise sits: split only when asked for or by default under secure."""
        if self.noise_placement is not None:
            return self.noise_placement
        secure_stats = self.protocol == "secure" and self.private_training == PrivateDesign.STATISTICS
        return Placement.SPLIT if secure_stats else Placement.LOCAL

    @property
    def dp_sgd_placement(self) -> Placement:
        """Where DP-SGD's noise sits: as asked, else where the statistics' noise sits (split under
        secure), and always local outside the statistics design."""
        if not self.statistics_design or self.method == "central-dp":
            return Placement.LOCAL
        return self.sgd_placement if self.sgd_placement is not None else self.placement

    @property
    def statistics_design(self) -> bool:
        return self.epsilon is not None and self.private_training == PrivateDesign.STATISTICS

    @property
    def planned_rounds(self) -> int:
        """Rounds a federated run plays: the statistics phase (moments, k-means, histogram)
        and the VAE rounds under the statistics design, `rounds` otherwise."""
        if not self.statistics_design:
            return self.rounds
        vae = self.vae_rounds * (self.sgd_steps if self.split_sgd else 1)
        return self.statistics_sizes.kmeans_iterations + 2 + self.planned_identifier_steps + vae

    @property
    def statistics_sizes(self) -> StatisticsSizes:
        """The statistics design's sizes: as set, else by epsilon (statistics_sizes)."""
        default = statistics_sizes(self.epsilon if self.epsilon is not None else 0.0)
        chosen = (self.fine_clusters, self.projection_dim, self.kmeans_iterations)
        return StatisticsSizes(*(d if c is None else c for d, c in zip(default, chosen, strict=True)))

    @property
    def split_sgd(self) -> bool:
        return self.dp_sgd_placement == Placement.SPLIT

    @property
    def distils_identifier(self) -> bool:
        """Whether the source classifier can be trained at a curator's noise: split DP-SGD, or
        the curator itself."""
        return self.statistics_design and (self.split_sgd or self.method == "central-dp")

    @property
    def planned_identifier_steps(self) -> int:
        if not self.distils_identifier:
            return 0
        return IDENTIFIER_STEPS if self.identifier_steps is None else self.identifier_steps

    @property
    def sgd_steps(self) -> int:
        """DP-SGD steps per VAE round: `local_epochs` expected passes of Poisson batches."""
        return self.local_epochs * max(1, round(1.0 / self.sample_rate))

    @property
    def cohort_minimum(self) -> int:
        return self.clients if self.min_clients is None else self.min_clients

    @property
    def model_components(self) -> int:
        """fedavg is one shared VAE, whatever --components says."""
        return 1 if self.method == "fedavg" else self.components

    @property
    def step_size(self) -> float:
        """Adam's step size for this run's training: `dp_learning_rate` in a private run (all
        its training is DP-SGD), else `learning_rate` or the dataset's default."""
        if self.epsilon is not None:
            return self.dp_learning_rate
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[self.dataset]

    @property
    def initial_temperature(self) -> float:
        return self.temperature if self.temperature is not None else DEFAULT_TEMPERATURE[self.dataset]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimulationConfig:
        """A configuration read back from JSON (config.json): every value of its field's type,
        so that a file edited by hand fails here with the field's name, not deep in a run."""
        if not isinstance(data, dict):
            raise ConfigError(f"a configuration is an object of named fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, data)) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}")
        data = _before_the_identifier(_without_earlier_defaults(data))
        hints = get_type_hints(cls)
        for name, value in data.items():
            if not _of_type(value, hints[name]):
                expected = _type_name(hints[name])
                raise ConfigError(f"configuration field {name!r} must be {expected}, got {value!r:.60}")
        return cls(**data)


# Defaults of settings that earlier versions wrote into every config.json, whether or not the
# run used them: a run whose config.json holds one where the setting does not apply used no
# value at all, so it reads back as today's default (which `_check_applicable` accepts).
_EARLIER_DEFAULTS: dict[str, object] = {"vae_rounds": 5, "sgd_placement": "local"}


def _before_the_identifier(data: dict[str, Any]) -> dict[str, Any]:
    """A private statistics-design run's config.json written before the source classifier
    existed ran without one: it reads back as identifier_steps 0, not today's default. Such a
    file holds every setting of its version (statistics_share among them) but this one; a
    dictionary of a few settings (no statistics_share) takes today's defaults."""
    statistics = data.get("private_training", PrivateDesign.STATISTICS) == PrivateDesign.STATISTICS
    written = "statistics_share" in data and "identifier_steps" not in data
    if data.get("epsilon") is not None and statistics and written:
        return data | {"identifier_steps": 0}
    return data


def _without_earlier_defaults(data: dict[str, Any]) -> dict[str, Any]:
    private = data.get("epsilon") is not None
    design = data.get("private_training", PrivateDesign.STATISTICS)
    statistics = private and design == PrivateDesign.STATISTICS
    central = data.get("method") == "central-dp"
    applies = {"vae_rounds": statistics, "sgd_placement": private and not central}
    return {k: v for k, v in data.items() if applies.get(k, True) or v != _EARLIER_DEFAULTS.get(k, object())}
