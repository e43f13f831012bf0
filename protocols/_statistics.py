"""The statistics phase's stages (DESIGN §2), shared by the `dp` and `secure` declarations.

Round 0 answers `start` with the moments; the next rounds answer the previous aggregate with
per-fine-cluster sums and counts; the last answers with the client's histogram over the fine
clusters, placed in its own block of a (clients x clusters) vector so that the server's sum
is the whole matrix. Each uplink field is one Gaussian release on the client's ledger.
"""

from __future__ import annotations

from collections.abc import Mapping

from securegmi.protocol import FieldKind, FieldSpec, ProtocolSpec, StageSpec

# Symbolic sizes: M moments (1 + D + D(D+1)/2), S cluster statistics (J x (d+1)), H the
# clients x clusters histogram matrix.
STATISTICS_DIMS = ("M", "S", "H")


def with_statistics(
    spec: ProtocolSpec, kind: FieldKind, what: str, statistics: Mapping[str, int] | None
) -> ProtocolSpec:
    """`spec` preceded by the statistics phase (sizes M, S, H), with a public `start` stage if
    `spec` has none; `spec` itself when `statistics` is None."""
    if statistics is None:
        return spec
    start = StageSpec(
        "start", "server", (FieldSpec("temperature", FieldKind.PUBLIC, (), "float64", "public constant"),)
    )
    has_start = any(s.name == "start" for s in spec.stages)
    return ProtocolSpec(
        spec.name,
        spec.description + " Preceded by the DP statistics phase.",
        (*(() if has_start else (start,)), *statistics_stages(kind, what), *spec.stages),
        spec.dims,
    ).bind(**{d: int(statistics[d]) for d in STATISTICS_DIMS})


def statistics_stages(kind: FieldKind, what: str) -> tuple[StageSpec, ...]:
    """Uplink and downlink stages of the statistics phase, every field of `kind`."""

    def one(stage: str, sender: str, name: str, dim: str, description: str) -> StageSpec:
        return StageSpec(stage, sender, (FieldSpec(name, kind, (dim,), "float64", description),))  # type: ignore[arg-type]

    return (
        one(
            "moments",
            "client",
            "moments",
            "M",
            f"{what}sum of (1, u, triu(u u^T)) + noise (event moments@round)",
        ),
        one(
            "cluster_stats",
            "client",
            "cluster_stats",
            "S",
            f"{what}per fine cluster: sum of z and count, + noise (event clusters@round)",
        ),
        one(
            "histogram",
            "client",
            "histogram",
            "H",
            f"{what}own row of fine-cluster counts + full noise, zeros elsewhere (event histogram@round)",
        ),
        one("moment_totals", "server", "aggregate", "M", f"{what}sum of the moments releases"),
        one("cluster_totals", "server", "aggregate", "S", f"{what}sum of the cluster releases"),
        one("histograms", "server", "aggregate", "H", f"{what}every client's released histogram"),
    )
