"""One summary of an attention graph: size, density, degrees, diameter, spectral gaps and NIP (``hopformer graph``)."""

from __future__ import annotations

import math
import time
from typing import Any

from hopformer.analysis.nip import degree_stats, diameter, information_payload
from hopformer.analysis.spectral import spectral_gap
from hopformer.graphs import BlockGraph


def measure_graph(
    graph: BlockGraph,
    pattern: str,
    alpha: float,
    hops: int,
    spectral_level: str = "token",
    nip_level: str = "block",
    hub_correction: bool = True,
) -> dict[str, Any]:
    """One table row: size, density, degrees, diameter, spectral gaps and NIP of ``graph``.

    A graph with an isolated node (at ``nip_level``) gets diameter ``inf`` and NIP ``nan`` ("undefined"
    in the table) instead of aborting the whole table; :func:`~hopformer.analysis.nip` itself raises.
    """
    start = time.perf_counter()
    gap = spectral_gap(graph, level=spectral_level)
    gap_hops = spectral_gap(graph, alpha, hops, level=spectral_level)
    gap_exact = spectral_gap(graph, alpha, level=spectral_level)
    spectral_seconds = time.perf_counter() - start
    start = time.perf_counter()
    degrees = degree_stats(graph, level=nip_level)
    if degrees["degree_min"] > 0:
        payload = information_payload(graph, hub_correction, level=nip_level)
        kappa, mean_degree, hubs = payload.diameter, payload.mean_degree, payload.num_hubs
        nip_value, log10_nip = payload.nip, payload.log_nip / math.log(10)
    else:  # NIP is undefined (1/deg of an isolated node); the diameter is infinite
        kappa, mean_degree, hubs = diameter(graph, level=nip_level), degrees["degree_mean"], degrees["hubs"]
        nip_value, log10_nip = math.nan, math.nan
    nip_seconds = time.perf_counter() - start
    return {
        "pattern": pattern,
        "name": graph.name,
        "seq_len": graph.seq_len,
        "block_size": graph.block_size,
        "density": graph.density,
        "keys_per_query": float(graph.keys_per_query().double().mean()),
        "diameter": kappa,
        "degree_min": degrees["degree_min"],
        "mean_degree": mean_degree,
        "degree_max": degrees["degree_max"],
        "hubs": hubs,
        "gap": gap,
        "gap_hops": gap_hops,
        "gap_exact": gap_exact,
        "nip": nip_value,
        "log10_nip": log10_nip,
        "spectral_seconds": spectral_seconds,
        "nip_seconds": nip_seconds,
    }
