"""Reference implementations, written from the definitions for clarity, not speed.

- :class:`DenseOperator` and :data:`DENSE`, the ``dense`` backend: the full ``(batch, heads, seq, seq)``
  attention matrix on the graph's edges. Every other backend is tested against it.
- :func:`combiner_partition` and :func:`combiner_reference`: each query's Combiner partition listed with
  plain loops, and the dense attention matrix it implies (small lengths).
- :func:`routing_reference`: Routing attention from given memberships, one ``(seq, seq)`` mask per cluster.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hopformer.graphs import BlockGraph
from hopformer.ops.backend import NO_OPTIONS, HopOptions, Support
from hopformer.ops.combiner_attention import check_combiner_inputs
from hopformer.ops.common import masked_softmax, run_diffusion, token_mask
from hopformer.ops.routing_attention import SCATTER_EPS

Partition = list[tuple[list[int], list[list[int]]]]  # per query: (direct set, regions)


# ------------------------------------------------------------------------------- the dense backend
class DenseOperator:
    """The attention ``A`` materialised: row softmax of ``q k^T * scale`` on the graph's edges to real keys
    (rows of padded queries are zero), in q's dtype."""

    def __init__(
        self, q: torch.Tensor, k: torch.Tensor, graph: BlockGraph, key_padding_mask: torch.Tensor | None, scale: float
    ) -> None:
        mask = token_mask(graph, key_padding_mask, q.device)
        if key_padding_mask is not None:
            mask = mask & key_padding_mask[:, None, :, None]
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        # in q's dtype: under bf16 autocast the softmax comes out fp32, and every hop would cast it again
        self.matrix = masked_softmax(scores, mask).to(q.dtype)

    def dropped(self, p: float) -> DenseOperator:
        """The same operator with edge dropout ``p`` (a fresh mask)."""
        other = object.__new__(DenseOperator)
        other.matrix = F.dropout(self.matrix, p)
        return other

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.matrix, z)


class DenseBackend:
    """``dense``: the reference. Materialises the token mask and every score; for tests and small inputs."""

    name = "dense"
    summary = "the reference: materialises the seq x seq scores (tests, small inputs)"
    support = Support(ops=("sparse_attention", "diffuse", "diffuse_weighted"), devices=("cpu", "cuda"))

    def diffuse(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        graph: BlockGraph,
        key_padding_mask: torch.Tensor | None,
        steps: Sequence[float],
        scale: float,
        options: HopOptions = NO_OPTIONS,
    ) -> torch.Tensor:
        operator = DenseOperator(q, k, graph, key_padding_mask, scale)
        p, per_hop = options.dropout_p, options.edge_dropout == "per_hop"
        once = operator.dropped(p) if p > 0 and not per_hop else operator

        def attend(z: torch.Tensor, _: int) -> torch.Tensor:
            return operator.dropped(p).apply(z) if p > 0 and per_hop else once.apply(z)

        return run_diffusion(attend, v, steps, options.hop_dropout_p)

    def operator(
        self, q: torch.Tensor, k: torch.Tensor, graph: BlockGraph, key_padding_mask: torch.Tensor | None, scale: float
    ) -> DenseOperator:
        """``A`` computed once, for callers that apply it many times (learned hop weights)."""
        return DenseOperator(q, k, graph, key_padding_mask, scale)


DENSE = DenseBackend()


# ------------------------------------------------------------------------------------------ Combiner


def combiner_partition(variant: str, seq_len: int, block_size: int, causal: bool) -> list[Partition]:
    """Per plan (two for ``mixture``), per position of the padded sequence: (direct set, regions).

    Positions run over ``ceil(seq_len / block_size) * block_size``; positions ``>= seq_len`` are
    internal padding (the caller treats them as not real). Written from the definitions with plain
    loops, independently of the fast path.
    """
    if variant == "mixture":
        return [
            combiner_partition(form, seq_len, block_size, causal)[0] for form in ("axial_vertical", "axial_horizontal")
        ]
    s = block_size
    n = -(-seq_len // s) * s
    plan: Partition = []
    for i in range(n):
        last = i if causal else n - 1  # the support is [0, last]
        if variant == "fixed":
            t = i // s
            direct = [j for j in range(t * s, t * s + s) if j <= last]
            others = [u for u in range(n // s) if (u < t if causal else u != t)]
            regions = [list(range(u * s, u * s + s)) for u in others]
        elif variant == "logsparse":
            t, blocks = i // s, n // s
            direct = [j for j in range(t * s, t * s + s) if j <= last]
            regions = []
            lo, hi = 0, 1 << (blocks - 1).bit_length()  # descend the binary tree to leaf t
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if t < mid:
                    if not causal:
                        regions.append(list(range(mid * s, min(hi, blocks) * s)))
                    hi = mid
                else:
                    regions.append(list(range(lo * s, mid * s)))
                    lo = mid
            regions = [r for r in regions if r]
        else:  # axial: grid position (r, c), rows of length s
            r, c = divmod(i, s)
            rows = n // s
            off_row = [t for t in range(rows) if (t < r if causal else t != r)]
            direct = [r * s + e for e in range(s) if r * s + e <= last] + [t * s + c for t in off_row]
            if variant in ("axial", "axial_vertical"):
                regions = [[t * s + e for t in off_row] for e in range(s) if e != c]
            else:
                regions = [[t * s + e for e in range(s) if e != c] for t in off_row]
            regions = [x for x in regions if x]
        plan.append((direct, regions))
    return [plan]


def combiner_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    variant: str = "fixed",
    block_size: int | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense Combiner: returns ``(P @ v, P)`` with ``P`` the implied ``(batch, heads, seq, seq)``.

    Built from :func:`combiner_partition` one query and one region at a time (slow; small ``L``).
    ``mixture`` averages the two plans' matrices.
    """
    block_size = check_combiner_inputs(q, k, v, variant, block_size, causal, key_padding_mask, 0.0)
    batch, heads, seq, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else float(scale)
    plans = combiner_partition(variant, seq, block_size, causal)
    real = [
        [j < seq and (key_padding_mask is None or bool(key_padding_mask[b, j])) for j in range(len(plans[0]))]
        for b in range(batch)
    ]
    rows = []
    for b in range(batch):
        for h in range(heads):
            qq, kk = q[b, h], k[b, h]
            for i in range(seq):
                row = q.new_zeros(seq)
                for plan in plans:
                    if real[b][i]:
                        row = row + _reference_row(qq, kk, i, plan[i], real[b], seq, scale) / len(plans)
                rows.append(row)
    p = torch.stack(rows).view(batch, heads, seq, seq)
    return p @ v, p


def _reference_row(q, k, i, parts, real, seq, scale) -> torch.Tensor:
    direct, regions = parts
    direct = [j for j in direct if real[j]]
    regions = [[j for j in region if real[j]] for region in regions]
    regions = [region for region in regions if region]
    logits, inner = [], []
    for j in direct:
        logits.append(q[i] @ k[j] * scale)
    for region in regions:
        k_region = k[region].amax(0)
        q_region = q[region].amax(0)
        logits.append(q[i] @ k_region * scale)
        inner.append(torch.softmax(k[region] @ q_region * scale, 0))
    weights = torch.softmax(torch.stack(logits), 0)
    row = q.new_zeros(seq).index_add(0, torch.tensor(direct, dtype=torch.long), weights[: len(direct)])
    for w, region, p in zip(weights[len(direct) :], regions, inner):
        row = row.index_add(0, torch.tensor(region), w * p)
    return row


# ------------------------------------------------------------------------------------------- Routing
def routing_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_idx: torch.Tensor,
    key_idx: torch.Tensor,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    *,
    shared_qk: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense routing attention from given memberships: one ``(seq, seq)`` mask per cluster (tests)."""
    batch, heads, seq, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else float(scale)
    positions = torch.arange(seq, device=q.device)
    real = torch.ones(batch, seq, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    scores = q @ k.transpose(-1, -2) * scale
    sums = torch.zeros(batch, heads, seq, v.shape[-1], dtype=q.dtype)
    counts = torch.zeros(batch, heads, seq, dtype=q.dtype)
    for c in range(query_idx.shape[2]):
        is_query = F.one_hot(query_idx[:, :, c], seq).sum(-2).bool()  # (B, H, L)
        is_key = F.one_hot(key_idx[:, :, c], seq).sum(-2).bool()
        mask = is_query[..., :, None] & is_key[..., None, :] & real[:, None, None, :]
        if causal:
            mask = mask & (positions[:, None] >= positions[None, :])
        if shared_qk:
            eye = torch.eye(seq, dtype=torch.bool)
            others = mask & ~eye
            mask = others | (mask & eye & ~others.any(-1, keepdim=True))
        row_ok = mask.any(-1) & real[:, None, :]
        probs = scores.masked_fill(~mask, -torch.inf).softmax(-1).nan_to_num(0.0)
        sums = sums + (probs @ v) * row_ok[..., None]
        counts = counts + row_ok.to(q.dtype)
    return sums / (counts[..., None] + SCATTER_EPS)


def causal_routing_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_cluster: torch.Tensor,
    key_cluster: torch.Tensor,
    window: int,
    key_padding_mask: torch.Tensor | None = None,
    *,
    shared_qk: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal routing from given clusters, one query at a time: the last ``window`` real keys of the
    query's cluster before it, and itself (with ``shared_qk`` only when there are none)."""
    batch, heads, seq, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else float(scale)
    real = torch.ones(batch, seq, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    rows = []
    for b in range(batch):
        for h in range(heads):
            for i in range(seq):
                if not real[b, i]:
                    rows.append(v.new_zeros(v.shape[-1]))
                    continue
                same = [j for j in range(i) if real[b, j] and key_cluster[b, h, j] == query_cluster[b, h, i]]
                keys = same[-window:] if window else []
                if not (shared_qk and keys):
                    keys = keys + [i]
                weights = torch.softmax(torch.stack([q[b, h, i] @ k[b, h, j] for j in keys]) * scale, 0)
                rows.append(sum(w * v[b, h, j] for w, j in zip(weights, keys)))
    return torch.stack(rows).view(batch, heads, seq, v.shape[-1])
