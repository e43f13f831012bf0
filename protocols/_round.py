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
from securegmi.protocol import FieldKind, FieldSpec, ProtocolSpec, StageSpec
from securegmi.protocol.spec import Codec, Release
from securegmi.vocabulary import EventName, FieldName, Stage

# Symbolic sizes: M moments (1 + D + D(D+1)/2), S cluster statistics (J x (d+1)), H the
# clients x clusters histogram matrix; G, where DP-SGD's noise is split, the K x P gradient.
# N is a count, not a size: the fewest client releases a private phase's aggregate may sum.
STATISTICS_DIMS = ("M", "S", "H", "N")
GRADIENT_DIM = "G"
# I, where the plan distils a source classifier: its parameter count.
IDENTIFIER_DIM = "I"


def start_stage() -> StageSpec:
    """Round 0's downlink: clients begin from the public initialisation they already hold (a
    CKKS server could not encrypt it anyway: it holds no secret key)."""
    temperature = FieldSpec(
        FieldName.TEMPERATURE, FieldKind.PUBLIC, (), "float64", "likelihood temperature (public schedule)"
    )
    return StageSpec(Stage.START, "server", (temperature,))


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
    top_b = FieldName.COMPONENT_INDEX in describe

    def one(name: str, shape: tuple[str, ...], dtype: str, **how: str | None) -> FieldSpec:
        return FieldSpec(name, kind, shape, dtype, describe[name], **how)

    broadcast = StageSpec(
        Stage.BROADCAST,
        "server",
        (
            one(FieldName.COMPONENT_SUMS, ("K", "P"), "float32", sum_of=FieldName.WEIGHTED_COMPONENTS),
            one(
                FieldName.COMPONENT_MASSES,
                ("K",),
                "float64",
                sum_of=FieldName.MASSES,
                packed_in=FieldName.COMPONENT_SUMS if pack_masses else None,
            ),
            start_stage().fields[0],
        ),
    )
    sent = (one(FieldName.COMPONENT_INDEX, ("B",), "int64"),) if top_b else ()
    weighted = one(FieldName.WEIGHTED_COMPONENTS, ("B" if top_b else "K", "P"), "float32")
    if top_b:
        weighted = replace(weighted, rows_at=FieldName.COMPONENT_INDEX)
    packed = FieldName.WEIGHTED_COMPONENTS if pack_masses else None
    masses = one(FieldName.MASSES, ("K",), "float64", packed_in=packed)
    update = StageSpec(Stage.UPDATE, "client", (masses, *sent, weighted))
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
    if IDENTIFIER_DIM in statistics:
        stages += identifier_stages(kind, what)
        dims[IDENTIFIER_DIM] = int(statistics[IDENTIFIER_DIM])
    if GRADIENT_DIM in statistics:
        stages += gradient_stages(kind, what)
        dims[GRADIENT_DIM] = int(statistics[GRADIENT_DIM])
    return replace(
        spec,
        description=spec.description + " Preceded by the DP statistics phase.",
        stages=(spec.stage(Stage.START), *stages, *spec.stages[1:]),
    ).bind(**dims)


def contributions() -> FieldSpec:
    """How many client releases a private aggregate sums: public (the server sees who
    answered), and checked by both ends against the declared minimum N."""
    return FieldSpec(
        FieldName.CONTRIBUTIONS, FieldKind.PUBLIC, (), "int64", "client releases the aggregate sums"
    )


def gradient_stages(
    kind: FieldKind,
    what: str,
    stages: tuple[Stage, Stage] = (Stage.GRADIENT, Stage.GRADIENT_TOTALS),
    field: FieldName = FieldName.GRADIENT,
    dim: str = GRADIENT_DIM,
    trained: str = "",
) -> tuple[StageSpec, ...]:
    """One DP-SGD step per round with the noise split across clients (the plan's
    `sgd_placement`): each client's clipped gradient sum plus its noise share, and their sum.
    The same pair of stages, under their own names, steps the source classifier."""
    up = FieldSpec(
        field,
        kind,
        (dim,),
        "float64",
        what + f"{trained}clipped gradient sum + noise share (event {EventName.DPSGD}@round)",
    )
    down = FieldSpec(
        FieldName.AGGREGATE,
        kind,
        (dim,),
        "float64",
        what + f"sum of the {trained}gradient releases",
        sum_of=field,
    )
    totals = StageSpec(stages[1], "server", (down, contributions()), min_shares="N")
    return StageSpec(stages[0], "client", (up,)), totals


def identifier_stages(kind: FieldKind, what: str) -> tuple[StageSpec, ...]:
    """The source classifier's split DP-SGD steps (I: its parameter count)."""
    return gradient_stages(
        kind,
        what,
        (Stage.IDENTIFIER_GRADIENT, Stage.IDENTIFIER_TOTALS),
        FieldName.IDENTIFIER_GRADIENT,
        IDENTIFIER_DIM,
        "source classifier's ",
    )


def statistics_stages(kind: FieldKind, what: str) -> tuple[StageSpec, ...]:
    """Uplink and downlink stages of the statistics phase, every field of `kind`. Each uplink
    stage carries one field of its own name; each downlink, that field's sum."""

    def up(name: Stage, dim: str, description: str) -> StageSpec:
        field = FieldSpec(FieldName(name), kind, (dim,), "float64", what + description)
        return StageSpec(name, "client", (field,))

    def down(stage: Stage, of: Stage, dim: str, description: str) -> StageSpec:
        field = FieldSpec(FieldName.AGGREGATE, kind, (dim,), "float64", what + description, sum_of=of)
        return StageSpec(stage, "server", (field, contributions()), min_shares="N")

    moments, clusters, histogram = EventName.MOMENTS, EventName.CLUSTERS, EventName.HISTOGRAM
    return (
        up(Stage.MOMENTS, "M", f"sum of (1, u, triu(u u^T)) + noise (event {moments}@round)"),
        up(
            Stage.CLUSTER_STATS,
            "S",
            f"per fine cluster: sum of z and count, + noise (event {clusters}@round)",
        ),
        up(
            Stage.HISTOGRAM,
            "H",
            f"own row of fine-cluster counts + full noise, zeros elsewhere (event {histogram}@round)",
        ),
        down(Stage.MOMENT_TOTALS, Stage.MOMENTS, "M", "sum of the moments releases"),
        down(Stage.CLUSTER_TOTALS, Stage.CLUSTER_STATS, "S", "sum of the cluster releases"),
        down(Stage.HISTOGRAMS, Stage.HISTOGRAM, "H", "every client's released histogram"),
    )
