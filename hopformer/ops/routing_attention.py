"""Routing attention: content-based sparse attention through balanced clusters (Roy et al., TACL 2021).

Each centroid ``mu_c`` (``centroids (heads, clusters, head_dim)``) takes the ``window`` tokens whose
*normalised* vectors are most similar to it (top-w: every cluster has exactly ``window`` members; a
token may be in several clusters or in none). Inside each cluster, queries attend densely to the
cluster's keys with scores ``q k^T * scale`` (raw q, k; ``scale = head_dim ** -0.5`` by default;
normalisation only decides membership). A token's output is the mean of its outputs over the
clusters that selected it as a query (``sum / (count + 1e-5)``); a token no cluster selected gets 0.

Fast path: gather the members into ``(batch, heads, clusters, window, head_dim)``, run batched SDPA
(no mask at all for the bidirectional, unshared, unpadded case), scatter back with ``index_add``.
Memory ``O(clusters * window^2)`` for scores, never ``O(seq^2)``.

Membership (``shared_qk=False``): queries are ranked by q-similarity and keys by k-similarity, two
index sets. ``shared_qk=True`` (``k`` is the query projection): one index set, ranked by q, and a
token never attends to itself unless it is its only allowed key (q . q would dominate, as in
Reformer).

**Causal** (``causal=True``, :func:`causal_clustered_attention`): balanced top-w membership ranks the whole
sequence, so future tokens would compete for the slots of a cluster and change what the past sees.
Causal routing is therefore strictly causal and unbalanced: each token joins the cluster of its nearest
centroid (queries by q, keys by k; one assignment with shared QK), decided by its own vector alone, and
a query at position ``i`` attends to the last ``window`` keys of its cluster before ``i`` and to itself
(with shared QK, to itself only when no earlier key is in its cluster). Every row has a key, nothing
depends on a later token, and the cost is ``O(seq * window)``.

Padding (``key_padding_mask``, True = real): padded tokens get similarity ``-inf`` before the top-w,
so they are chosen only when a cluster has more slots than there are real tokens; such picks are
masked as keys and produce nothing as queries.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from hopformer.checks import InputTypeError, check_finite, check_int, check_probability
from hopformer.graphs.tracing import exporting
from hopformer.ops.common import check_key_padding_mask, check_qkv, describe_shape, masked_softmax
from hopformer.ops.masked_sdpa import masked_sdpa

QK_NORMS = ("layernorm", "layernorm_noaffine", "l2")
SCATTER_EPS = 1e-5
# float32 elements of one (batch, heads, seq, d) temporary of commitment_loss (16 MiB). Its backward holds a
# handful of them at once: at 64K tokens, 4 heads per chunk (64 MiB each) made it the peak of Routing's whole
# forward+backward.
CHUNK_ELEMENTS = 1 << 22
# float32 elements of one similarity table in rank / nearest_centroid (128 MiB): two heads at 64K tokens and 256
# clusters, so top-k runs half as many, fuller launches; the table lives only inside the no-grad ranking.
TABLE_ELEMENTS = 1 << 25


def routing(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centroids: torch.Tensor,
    window: int,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    *,
    shared_qk: bool = False,
    qk_norm: str = "layernorm",
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Routing attention with fixed centroids on ``(batch, heads, seq, head_dim)`` tensors.

    Args:
        q, k, v: ``(batch, heads, seq, head_dim)``; ``v`` may have its own last dimension.
        centroids: ``(heads, clusters, head_dim)``, compared with the normalised q / k.
        window: members per cluster, ``1 <= window <= seq``.
        causal: strictly causal routing (:func:`causal_clustered_attention`: nearest-centroid clusters, each query on
            the last ``window`` keys of its cluster before it); ``window`` need not exceed ``seq`` then.
        key_padding_mask: bool ``(batch, seq)``, True = real token.
        shared_qk: one membership per cluster for queries and keys, and no attention to oneself
            unless it is the only allowed key.
        qk_norm: ``"layernorm"`` (no affine; alias ``"layernorm_noaffine"``) or ``"l2"``, used to
            rank tokens against the centroids.
        scale: score scale, default ``head_dim ** -0.5``.
        dropout_p: dropout on the attention probabilities (pass 0 in eval).

    Returns:
        ``(batch, heads, seq, v.shape[-1])``.
    """
    _check_inputs(q, k, v, centroids, window, causal, key_padding_mask, qk_norm, dropout_p)
    scale = None if scale is None else check_finite("scale", scale)
    if causal:
        query_cluster, key_cluster = nearest_clusters(q, k, centroids, shared_qk=shared_qk, qk_norm=qk_norm)
        return causal_clustered_attention(
            q, k, v, query_cluster, key_cluster, window, key_padding_mask,
            shared_qk=shared_qk, scale=scale, dropout_p=dropout_p,
        )  # fmt: skip
    query_idx, key_idx = memberships(q, k, centroids, window, key_padding_mask, shared_qk=shared_qk, qk_norm=qk_norm)
    return clustered_attention(
        q, k, v, query_idx, key_idx, causal, key_padding_mask,
        shared_qk=shared_qk, scale=scale, dropout_p=dropout_p,
    )  # fmt: skip


def normalise(x: torch.Tensor, qk_norm: str = "layernorm") -> torch.Tensor:
    """The vectors routing clusters: LayerNorm without affine (norm ``sqrt(d)``) or unit L2 norm."""
    if qk_norm == "l2":
        return F.normalize(x, dim=-1)
    if qk_norm in ("layernorm", "layernorm_noaffine"):
        return F.layer_norm(x, x.shape[-1:])
    raise ValueError(f"qk_norm={qk_norm!r} is not known; choose one of {list(QK_NORMS)}")


def top_window(similarity: torch.Tensor, window: int, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Balanced membership: per centroid the ``window`` most similar tokens, sorted by position.

    ``similarity (batch, heads, clusters, seq)`` -> indices ``(batch, heads, clusters, window)``.
    Padded tokens are ranked last (``-inf``).
    """
    if key_padding_mask is not None:
        similarity = similarity.masked_fill(~key_padding_mask[:, None, None, :], -torch.inf)
    # Sorting by position keeps gathers local and makes the causal mask of shared QK lower-triangular; the top-w
    # need no order of their own (topk's sorted=False skips sorting them by similarity first).
    return similarity.topk(window, dim=-1, sorted=False).indices.sort(dim=-1).values


def memberships(
    q: torch.Tensor,
    k: torch.Tensor,
    centroids: torch.Tensor,
    window: int,
    key_padding_mask: torch.Tensor | None = None,
    *,
    shared_qk: bool = False,
    qk_norm: str = "layernorm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key members of every cluster, ``(batch, heads, clusters, window)`` each.

    With ``shared_qk`` both are the same index set, ranked by the normalised q.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)  # rank in at least float32 (see similarity)
    with torch.no_grad():  # membership is discrete: no gradient through the ranking
        query_idx = rank(normalise(q.to(dtype), qk_norm), centroids, window, key_padding_mask, with_error=False).members
        if shared_qk:
            return query_idx, query_idx
        key_idx = rank(normalise(k.to(dtype), qk_norm), centroids, window, key_padding_mask, with_error=False).members
    return query_idx, key_idx


class Ranking(NamedTuple):
    """What ranking normalised tokens against the centroids gives (:func:`rank`)."""

    members: torch.Tensor  # (batch, heads, clusters, window): top-w tokens per centroid, sorted by position
    assignment: torch.Tensor  # (batch, heads, seq): each token's nearest centroid
    error: torch.Tensor | None  # (batch, heads, seq): mean squared distance to it, over features (commitment error)


def rank(
    x_norm: torch.Tensor,
    centroids: torch.Tensor,
    window: int,
    key_padding_mask: torch.Tensor | None,
    *,
    with_error: bool = True,
) -> Ranking:
    """Members (top-w per centroid), nearest centroid and (``with_error``) commitment error of normalised tokens
    ``x_norm (batch, heads, seq, d)``.

    A few heads at a time: the float32 similarity table of a chunk holds at most ``TABLE_ELEMENTS``, or one
    head's (at 64K tokens and 256 clusters two heads, 128 MiB, instead of 64 MiB times the heads).
    """
    members, assignment, error = [], [], []
    batch, heads, seq, _ = x_norm.shape
    for chunk in _head_chunks(heads, batch * centroids.shape[1] * seq, TABLE_ELEMENTS):
        table = similarity(x_norm[:, chunk], centroids[chunk])
        members.append(top_window(table, window, key_padding_mask))
        if with_error:
            nearest, distance = _nearest(table, x_norm[:, chunk], centroids[chunk])
            error.append(distance)
        else:
            nearest = table.argmax(2)
        assignment.append(nearest)
        del table
    return Ranking(torch.cat(members, 1), torch.cat(assignment, 1), torch.cat(error, 1) if with_error else None)


def nearest_centroid(x_norm: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The nearest centroid of each normalised token, ``(batch, heads, seq)``, a few heads at a time."""
    batch, heads, seq, _ = x_norm.shape
    return torch.cat(
        [
            similarity(x_norm[:, chunk], centroids[chunk]).argmax(2)
            for chunk in _head_chunks(heads, batch * centroids.shape[1] * seq, TABLE_ELEMENTS)
        ],
        dim=1,
    )


def nearest_with_error(x_norm: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest_centroid` and each token's commitment error (as :class:`Ranking`'s)."""
    batch, heads, seq, _ = x_norm.shape
    parts = [
        _nearest(similarity(x_norm[:, chunk], centroids[chunk]), x_norm[:, chunk], centroids[chunk])
        for chunk in _head_chunks(heads, batch * centroids.shape[1] * seq, TABLE_ELEMENTS)
    ]
    return torch.cat([nearest for nearest, _ in parts], 1), torch.cat([error for _, error in parts], 1)


def _nearest(table: torch.Tensor, x_norm: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # ||x - mu||^2 = ||x||^2 - 2 x.mu + ||mu||^2, with x.mu the table's best entry: the commitment loss's forward
    # reads this instead of normalising the tokens and gathering their centroids again.
    best, nearest = table.max(2)
    centroid_norms = _assigned(centroids.to(table.dtype).pow(2).sum(-1), nearest)
    error = x_norm.to(table.dtype).pow(2).sum(-1) - 2 * best + centroid_norms
    return nearest, error.clamp_min(0) / x_norm.shape[-1]


def _head_chunks(heads: int, elements_per_head: int, budget: int | None = None) -> list[slice]:
    """Slices of the heads whose temporaries hold at most ``budget`` elements (``CHUNK_ELEMENTS``), or one head."""
    if exporting():  # an exported program takes any batch size: no chunks that depend on it
        return [slice(0, heads)]
    step = max(1, (CHUNK_ELEMENTS if budget is None else budget) // max(1, elements_per_head))
    return [slice(start, min(start + step, heads)) for start in range(0, heads, step)]


def similarity(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, clusters, seq)`` dot products of normalised tokens with the centroids.

    Computed in at least float32: in bfloat16 the ranking of ``sqrt(d)``-norm vectors is coarse
    enough to reorder the top-w (measured: most memberships change at d = 64).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.einsum("bhld,hcd->bhcl", x.to(dtype), centroids.to(dtype))


class _CommitmentLoss(torch.autograd.Function):
    """``sum_{b,h,l} weight[b,l] * mean_d (normalise(x) - centroid[assignment])^2`` with its gradient in closed form,
    a few heads at a time: only ``x`` (a view the attention keeps anyway) is saved, never float32 copies of the
    normalised tokens (at 64K tokens, 100 MiB per tensor per layer), and the backward is a handful of element-wise
    passes instead of an autograd recomputation (which cost about as much as the rest of Routing's step). The
    forward sums the ranking's ``error`` (:class:`Ranking`) where it is given."""

    @staticmethod
    def forward(ctx, x, centroids, assignment, weight, qk_norm, error):
        batch, heads, seq, dim = x.shape
        ctx.chunks = _head_chunks(heads, batch * seq * dim)
        if error is not None:
            total = (error * weight[:, None]).sum()
        else:
            total = weight.new_zeros(())
            for chunk in ctx.chunks:
                part = _chunk_commitment(x[:, chunk], centroids[chunk], assignment[:, chunk], weight, qk_norm)
                total = total + part
        ctx.save_for_backward(x, centroids, assignment, weight)
        ctx.qk_norm = qk_norm
        return total

    @staticmethod
    def backward(ctx, grad):
        x, centroids, assignment, weight = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        scale = weight[:, None, :, None] * (grad * 2 / x.shape[-1])  # d loss / d x_norm = scale * (x_norm - mu)
        for chunk in ctx.chunks:
            grad_x[:, chunk] = _normalised_grad(x[:, chunk], centroids[chunk], assignment[:, chunk], scale, ctx.qk_norm)
        return grad_x, None, None, None, None, None


def _normalised_grad(x, centroids, assignment, scale, qk_norm):
    """``d/dx`` of ``sum scale * (normalise(x) - centroid[assignment])^2 / 2`` through the normalisation (the
    chain rule of LayerNorm without affine, or of the unit L2 norm), in at least float32."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    target = _assigned(centroids.to(xf.dtype), assignment)
    if qk_norm == "l2":  # F.normalize: x / max(||x||, eps)
        norm = xf.norm(dim=-1, keepdim=True)
        divisor = norm.clamp_min(1e-12)
        unit = xf / divisor
        g = (unit - target) * scale
        projected = g - unit * (g * unit).sum(-1, keepdim=True) * (norm > 1e-12)
        return (projected / divisor).to(x.dtype)
    centred = xf - xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)  # F.layer_norm's eps
    unit = centred * rstd
    g = (unit - target) * scale
    return (rstd * (g - g.mean(-1, keepdim=True) - unit * (g * unit).mean(-1, keepdim=True))).to(x.dtype)


def _chunk_commitment(x, centroids, assignment, weight, qk_norm):
    # x (B, h, L, d) raw, centroids (h, C, d), assignment (B, h, L), weight (B, L)
    x_norm = normalise(x.to(torch.promote_types(x.dtype, torch.float32)), qk_norm)
    error = (x_norm - _assigned(centroids.to(x_norm.dtype), assignment)).pow(2).mean(-1)
    return (error * weight[:, None]).sum()


def _assigned(per_centroid: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Each token's entry of ``per_centroid (heads, clusters, ...)`` by ``assignment (batch, heads, seq)``."""
    heads = torch.arange(assignment.shape[1], device=assignment.device)[None, :, None]
    return per_centroid[heads, assignment]


def commitment_loss(
    x: torch.Tensor,
    centroids: torch.Tensor,
    assignment: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    qk_norm: str = "layernorm",
    error: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared distance of the normalised tokens to their assigned centroids (no gradient to the
    centroids), over real tokens, heads and features: the k-means commitment loss of one tensor.

    ``x (batch, heads, seq, d)``, ``centroids (heads, clusters, d)``, ``assignment (batch, heads, seq)``;
    ``error (batch, heads, seq)``: the distances the ranking found (:class:`Ranking`), which spare the forward
    from normalising ``x`` again. Memory-lean: the normalised tokens are recomputed in the backward (see
    ``_CommitmentLoss``).
    """
    batch, heads, seq, _ = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    if key_padding_mask is None:
        weight = x.new_full((batch, seq), 1.0 / (batch * heads * seq), dtype=dtype)
    else:
        real = key_padding_mask.to(dtype)
        weight = real / (real.sum() * heads).clamp_min(1.0)
    if torch.compiler.is_dynamo_compiling():  # (the recomputing backward calls autograd, which Dynamo cannot trace)
        return _chunk_commitment(x, centroids.detach().to(dtype), assignment, weight, qk_norm)
    return _CommitmentLoss.apply(x, centroids.detach().to(dtype), assignment, weight, qk_norm, error)


def clustered_attention(
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
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Dense attention inside given clusters, scattered back as a mean over memberships.

    ``query_idx``, ``key_idx``: ``(batch, heads, clusters, window)`` token positions, each row sorted
    (as :func:`memberships` returns them); with ``shared_qk`` they must be equal.
    """
    batch, heads, seq, head_dim = q.shape
    clusters, window = query_idx.shape[-2:]
    scale = head_dim**-0.5 if scale is None else float(scale)

    def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        flat = index.reshape(batch, heads, clusters * window, 1).expand(-1, -1, -1, x.shape[-1])
        return x.gather(2, flat).view(batch, heads * clusters, window, x.shape[-1])

    qc, kc, vc = gather(q, query_idx), gather(k, key_idx), gather(v, key_idx)
    mask = _cluster_mask(query_idx, key_idx, causal, key_padding_mask, shared_qk)
    valid = None  # (B, H*C, w): memberships that produce an output
    if mask is not None:
        row_ok = mask.any(-1, keepdim=True)  # keeps the mask's broadcast shape
        mask = mask | ~row_ok  # SDPA must not see an empty row; its output is dropped below
        valid = row_ok.squeeze(-1).expand(batch, heads * clusters, window)
    if key_padding_mask is not None:
        query_real = key_padding_mask.gather(1, query_idx.reshape(batch, -1))
        query_real = query_real.view(batch, heads * clusters, window)
        valid = query_real if valid is None else valid & query_real
    out = masked_sdpa(qc, kc, vc, mask, dropout_p=dropout_p, scale=scale)

    # Scatter-mean back to positions: one index_add over all (batch, head) rows at once.
    offsets = torch.arange(batch * heads, device=q.device).view(batch, heads, 1, 1) * seq
    index = (query_idx + offsets).reshape(-1)
    if valid is None:
        counts = torch.ones(index.shape, dtype=out.dtype, device=q.device)
    else:
        counts = valid.reshape(-1).to(out.dtype)
        out = out * valid[..., None].to(out.dtype)
    sums = out.new_zeros(batch * heads * seq, out.shape[-1]).index_add(0, index, out.reshape(-1, out.shape[-1]))
    total = out.new_zeros(batch * heads * seq).index_add(0, index, counts)
    return (sums / (total[:, None] + SCATTER_EPS)).view(batch, heads, seq, -1)


def nearest_clusters(
    q: torch.Tensor, k: torch.Tensor, centroids: torch.Tensor, *, shared_qk: bool = False, qk_norm: str = "layernorm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's nearest centroid, ``(batch, heads, seq)`` for queries (by q) and keys (by k; the same
    with ``shared_qk``): a token's cluster depends on its own vector alone (causal routing)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad():
        query_cluster = nearest_centroid(normalise(q.to(dtype), qk_norm), centroids)
        key_cluster = query_cluster if shared_qk else nearest_centroid(normalise(k.to(dtype), qk_norm), centroids)
    return query_cluster, key_cluster


def causal_clustered_attention(
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
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Strictly causal attention inside clusters: query ``i`` of cluster ``c`` attends to the last ``window``
    keys of cluster ``c`` at positions ``< i``, and to itself (with ``shared_qk`` only when there is no such
    key). ``query_cluster``, ``key_cluster``: ``(batch, heads, seq)`` ids; padded keys are never attended.

    Keys sorted by (cluster, position) put each cluster's keys in order, so a query's keys are the
    ``window`` entries before the place its own (cluster, position) would take there: one searchsorted
    and one gather, ``O(seq * window)`` memory, no ``seq x seq`` tensor.
    """
    batch, heads, seq, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else float(scale)
    positions = torch.arange(seq, device=q.device)
    if key_padding_mask is not None:  # padded keys go to a cluster no query is in
        key_cluster = torch.where(key_padding_mask[:, None, :], key_cluster, -1)
    key_code = key_cluster * seq + positions  # unique, and sorted by (cluster, position)
    order = key_code.argsort(dim=-1)
    sorted_code = key_code.gather(-1, order)
    ends = torch.searchsorted(sorted_code, query_cluster * seq + positions)  # first key of the cluster at >= i
    starts = torch.searchsorted(sorted_code, query_cluster * seq)  # the cluster's first key
    slots = ends[..., None] - window + torch.arange(window, device=q.device)  # (B, H, L, w) sorted indices
    allowed = slots >= starts[..., None]
    index = order.gather(-1, slots.clamp(min=0).flatten(-2)).view(batch, heads, seq, window)  # key positions

    def gather(x: torch.Tensor) -> torch.Tensor:
        flat = index.flatten(-2)[..., None].expand(-1, -1, -1, x.shape[-1])
        return x.gather(2, flat).view(batch, heads, seq, window, x.shape[-1])

    scores = torch.einsum("bhld,bhlwd->bhlw", q, gather(k)) * scale
    self_scores = (q * k).sum(-1, keepdim=True) * scale
    self_allowed = ~allowed.any(-1, keepdim=True) if shared_qk else torch.ones_like(allowed[..., :1])
    probs = masked_softmax(torch.cat([scores, self_scores], -1), torch.cat([allowed, self_allowed], -1))
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    out = torch.einsum("bhlw,bhlwd->bhld", probs[..., :window], gather(v)) + probs[..., window:] * v
    if key_padding_mask is not None:
        out = out * key_padding_mask[:, None, :, None].to(out.dtype)
    return out


def _cluster_mask(query_idx, key_idx, causal, key_padding_mask, shared_qk) -> torch.Tensor | None:
    """Bool ``(B, H*C, w, w)`` (or a broadcastable ``(w, w)``) mask, or None when all is allowed."""
    batch, heads, clusters, window = query_idx.shape
    device = query_idx.device
    allowed = None
    if shared_qk:
        # Sorted and equal index sets: positions are distinct and in order, so masks are static.
        if causal:
            allowed = torch.ones(window, window, dtype=torch.bool, device=device).tril()
    elif causal:
        q_pos = query_idx.view(batch, heads * clusters, window, 1)
        allowed = q_pos >= key_idx.view(batch, heads * clusters, 1, window)
    if key_padding_mask is not None:
        key_real = key_padding_mask.gather(1, key_idx.reshape(batch, -1))
        key_real = key_real.view(batch, heads * clusters, 1, window)
        allowed = key_real if allowed is None else allowed & key_real
    if not shared_qk:
        return allowed
    if allowed is None:
        allowed = torch.ones(window, window, dtype=torch.bool, device=device)
    # No attention to oneself unless it is the only allowed key.
    self_ = torch.eye(window, dtype=torch.bool, device=device)
    others = allowed & ~self_
    return others | (allowed & self_ & ~others.any(-1, keepdim=True))


def _check_inputs(q, k, v, centroids, window, causal, key_padding_mask, qk_norm, dropout_p) -> None:
    check_qkv(q, k, v)
    _, heads, seq, head_dim = q.shape
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 3 or centroids.shape[0] != heads:
        raise ValueError(f"centroids must be (heads={heads}, clusters, head_dim), got {describe_shape(centroids)}")
    if centroids.shape[1] < 1 or centroids.shape[2] != head_dim:
        raise ValueError(
            f"centroids must have at least one cluster and head_dim={head_dim}, got {describe_shape(centroids)}"
        )
    if not centroids.is_floating_point():
        raise InputTypeError(
            f"centroids must be a floating-point tensor (any float dtype), got dtype {centroids.dtype}"
        )
    if centroids.device != q.device:
        raise ValueError(f"centroids are on {centroids.device} but q is on {q.device}")
    if causal:  # a cluster's last `window` keys: any window works
        check_int("window", window, 1)
    else:
        check_int("window", window, 1, seq, allowed=f"an integer in [1, seq={seq}]")
    if not isinstance(causal, bool):
        raise InputTypeError(f"causal must be a bool, got {causal!r}")
    if qk_norm not in QK_NORMS:
        raise ValueError(f"qk_norm={qk_norm!r} is not known; choose one of {list(QK_NORMS)}")
    check_probability("dropout_p", dropout_p)
    check_key_padding_mask(key_padding_mask, q)
