"""Stages every protocol shares: the public `start` of round 0, and the statistics phase of a
private run (docs/design.md §2), shared by the `dp` and `secure` declarations.

The statistics phase: round 0 answers `start` with the moments; the next rounds answer the
previous aggregate with per-fine-cluster sums and counts; the last answers with the client's
histogram over the fine clusters, placed in its own block of a (clients x clusters) vector so
that the server's sum is the whole matrix. Each uplink field is one Gaussian release on the
client's ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from securegmi.errors import ConfigError
from securegmi.protocol import START, FieldKind, FieldSpec, ProtocolSpec, StageSpec
from securegmi.protocol.spec import CONTRIBUTIONS, Codec, Release

# Symbolic sizes: M moments (1 + D + D(D+1)/2), S cluster statistics (J x (d+1)), H the
# clients x clusters histogram matrix; G, where DP-SGD's noise is split, the K x P gradient.
# N is a count, not a size: the fewest client releases a private phase's aggregate may sum.
STATISTICS_DIMS = ("M", "S", "H", "N")
GRADIENT_DIM = "G"


def start_stage() -> StageSpec:
    """Round 0's downlink: clients begin from the public initialisation they already hold (a
    CKKS server could not encrypt it anyway: it holds no secret key)."""
    temperature = FieldSpec(
        "temperature", FieldKind.PUBLIC, (), "float64", "likelihood temperature (public schedule)"
    )
    return StageSpec(START, "server", (temperature,))


def fedgmi_protocol(
    name: str,
    description: str,
    kind: FieldKind,
    describe: Mapping[str, str],
    *,
    release: Release,
    codec: Codec,
    dims: Mapping[str, int],
    statistics: Mapping[str, int] | None = None,
    pack_masses: bool = False,
) -> ProtocolSpec:
    """A protocol of `start`, [the statistics phase,] then FedGMI rounds (`fedgmi_stages`)."""
    stages = (start_stage(), *fedgmi_stages(kind, describe, pack_masses))
    spec = ProtocolSpec(name, description, stages, release, codec).bind(**dims)
    what = "Enc: " if kind is FieldKind.CIPHERTEXT else ""
    return with_statistics(spec, kind, what, statistics)


def heaviest(components: int, top_b: int | None) -> int:
    """B, the number of components a client sends (all K unless `top_b`)."""
    b = components if top_b is None else top_b
    if not 1 <= b <= components:
        raise ConfigError(f"top_b must be between 1 and {components}, got {top_b}")
    return b


def fedgmi_stages(
    kind: FieldKind, describe: Mapping[str, str], pack_masses: bool = False
) -> tuple[StageSpec, StageSpec]:
    """The FedGMI round (docs/design.md §1): `broadcast` returns S_k and W_k, the sums of the clients'
    `update` (w_ck theta_ck and w_ck); every data-derived field of `kind`, described by
    `describe` (field name -> text). With a `component_index` description a client sends its B
    heaviest components and says which; without, all K. With `pack_masses` (ciphertexts) the K
    masses and their sums travel in the last chunk of the components' envelope."""
    top_b = "component_index" in describe

    def one(name: str, shape: tuple[str, ...], dtype: str, **how: str | None) -> FieldSpec:
        return FieldSpec(name, kind, shape, dtype, describe[name], **how)

    broadcast = StageSpec(
        "broadcast",
        "server",
        (
            one("component_sums", ("K", "P"), "float32", sum_of="weighted_components"),
            one(
                "component_masses",
                ("K",),
                "float64",
                sum_of="masses",
                packed_in="component_sums" if pack_masses else None,
            ),
            start_stage().fields[0],
        ),
    )
    sent = (one("component_index", ("B",), "int64"),) if top_b else ()
    weighted = one("weighted_components", ("B" if top_b else "K", "P"), "float32")
    if top_b:
        weighted = replace(weighted, rows_at="component_index")
    masses = one("masses", ("K",), "float64", packed_in="weighted_components" if pack_masses else None)
    update = StageSpec("update", "client", (masses, *sent, weighted))
    return broadcast, update


def with_statistics(
    spec: ProtocolSpec, kind: FieldKind, what: str, statistics: Mapping[str, int] | None
) -> ProtocolSpec:
    """`spec` with the statistics phase (sizes M, S, H) after its `start`; `spec` itself when
    `statistics` is None."""
    if statistics is None:
        return spec
    stages = statistics_stages(kind, what)
    missing = [d for d in STATISTICS_DIMS if d not in statistics]
    if missing:
        raise ConfigError(
            f"protocol {spec.name!r}: the statistics phase needs sizes {missing} "
            "(federation.statistics.statistics_dims gives them from the plan)"
        )
    dims = {d: int(statistics[d]) for d in STATISTICS_DIMS}
    if GRADIENT_DIM in statistics:
        stages += gradient_stages(kind, what)
        dims[GRADIENT_DIM] = int(statistics[GRADIENT_DIM])
    return replace(
        spec,
        description=spec.description + " Preceded by the DP statistics phase.",
        stages=(spec.stage(START), *stages, *spec.stages[1:]),
    ).bind(**dims)


def contributions() -> FieldSpec:
    """How many client releases a private aggregate sums: public (the server sees who
    answered), and checked by both ends against the declared minimum N."""
    return FieldSpec(CONTRIBUTIONS, FieldKind.PUBLIC, (), "int64", "client releases the aggregate sums")


def gradient_stages(kind: FieldKind, what: str) -> tuple[StageSpec, ...]:
    """One DP-SGD step per round with the noise split across clients (the plan's
    `sgd_placement`): each client's clipped gradient sum plus its noise share, and their sum."""
    up = FieldSpec(
        "gradient",
        kind,
        (GRADIENT_DIM,),
        "float64",
        what + "clipped gradient sum + noise share (event dpsgd@round)",
    )
    down = FieldSpec(
        "aggregate",
        kind,
        (GRADIENT_DIM,),
        "float64",
        what + "sum of the gradient releases",
        sum_of="gradient",
    )
    totals = StageSpec("gradient_totals", "server", (down, contributions()), min_shares="N")
    return StageSpec("gradient", "client", (up,)), totals


def statistics_stages(kind: FieldKind, what: str) -> tuple[StageSpec, ...]:
    """Uplink and downlink stages of the statistics phase, every field of `kind`."""

    def up(name: str, dim: str, description: str) -> StageSpec:
        return StageSpec(name, "client", (FieldSpec(name, kind, (dim,), "float64", what + description),))

    def down(stage: str, of: str, dim: str, description: str) -> StageSpec:
        field = FieldSpec("aggregate", kind, (dim,), "float64", what + description, sum_of=of)
        return StageSpec(stage, "server", (field, contributions()), min_shares="N")

    return (
        up("moments", "M", "sum of (1, u, triu(u u^T)) + noise (event moments@round)"),
        up("cluster_stats", "S", "per fine cluster: sum of z and count, + noise (event clusters@round)"),
        up(
            "histogram",
            "H",
            "own row of fine-cluster counts + full noise, zeros elsewhere (event histogram@round)",
        ),
        down("moment_totals", "moments", "M", "sum of the moments releases"),
        down("cluster_totals", "cluster_stats", "S", "sum of the cluster releases"),
        down("histograms", "histogram", "H", "every client's released histogram"),
    )
