"""Measures of attention graphs: the spectral gap (expander quality, before and after diffusion) and
the Normalized Information Payload (NIP), plus pictures (:mod:`hopformer.analysis.plots`, needs
matplotlib) and the ``hopformer graph`` verb (:mod:`hopformer.cli.graph`). For trained models,
:func:`attention_operators` rebuilds the matrices each attention layer applies to its values.

Every measure takes a :class:`~hopformer.graphs.BlockGraph` or a square bool adjacency matrix.
``hopformer.analysis.nip`` is the NIP function (the contract name); its module, with the
:class:`PayloadReport` internals, is ``importlib.import_module("hopformer.analysis.nip")``.
"""

from hopformer.analysis.nip import (
    PayloadReport,
    closed_form_nip,
    degree_stats,
    diameter,
    information_payload,
    nip,
)
from hopformer.analysis.operators import attention_operators
from hopformer.analysis.spectral import (
    adjacency_matrix,
    heat_spectral_map,
    ppr_spectral_map,
    spectral_gap,
    spectral_map,
    spectrum,
    transition_matrix,
)
from hopformer.analysis.summary import measure_graph

__all__ = [
    "PayloadReport",
    "adjacency_matrix",
    "attention_operators",
    "closed_form_nip",
    "degree_stats",
    "diameter",
    "heat_spectral_map",
    "information_payload",
    "measure_graph",
    "nip",
    "ppr_spectral_map",
    "spectral_gap",
    "spectral_map",
    "spectrum",
    "transition_matrix",
]
