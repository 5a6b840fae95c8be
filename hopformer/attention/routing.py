"""Routing Transformer attention module: local heads + routing heads with online spherical k-means.

``build("routing", dim, heads, local_heads=4, clusters=8, window=512, causal=True)``.

K-means state (per routing head, buffers, never trained by gradient): ``centroids (H_r, C, d)`` on
the sphere of the normalised vectors (radius 1 for ``l2``, ``sqrt(d)`` for ``layernorm``), and the
EMA tables ``ema_counts (H_r, C)``, ``ema_sums (H_r, C, d)``:
``n <- decay n + (1 - decay) count``, ``s <- decay s + (1 - decay) sum``,
``mu = radius * normalise(s / (n + 1e-5))`` (a cluster that never received mass keeps its centroid).

When the centroids change:

- **Before any training step** they are LayerNorm-ed (or L2-normalised) Gaussian vectors drawn at
  construction (the reference code's init), so eval / generation before training works and does not
  depend on the batch.
- **First training forward**: initialised from that batch (sampled normalised q/k tokens and
  ``kmeans_iters`` rounds of spherical k-means), then ``initialised`` is set (persistent buffer).
- **Every training forward** adds the batch's assignment counts and sums (real tokens, q and k) to a
  pending buffer. With ``update="auto"`` the pending statistics are applied as one EMA step at the
  start of the next training forward; with ``update="manual"`` they accumulate (averaged over the
  forwards, e.g. the micro-batches of one optimiser step) until :meth:`update_centroids` is called.
  Deferring the step keeps a checkpoint recomputation routing with exactly the centroids its forward
  used.
- **Never in eval mode, and never during activation recomputation**: a forward that runs inside the
  autograd engine (``torch._C._current_graph_task_id() != -1``, which is how both reentrant and
  non-reentrant ``torch.utils.checkpoint`` recompute) neither initialises nor updates nor records
  statistics. A reentrant checkpoint's first, no-grad pass is the real forward and is recorded.
- Under ``torch.distributed`` the pending counts and sums are all-reduced (summed over ranks: each rank
  records its share of the global batch) before the EMA, and the data initialisation is broadcast from
  rank 0, so all ranks keep the same centroids.

Commitment loss ``commitment * mean ||x - sg(mu_c(x))||^2`` (mean over real tokens, heads and
features; summed over the normalised Q and K, Q only with shared QK) is left in ``self.aux_loss``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hopformer import graphs
from hopformer.attention.base import AttentionModule
from hopformer.attention.decoding import RoutingCache
from hopformer.attention.registry import register
from hopformer.checks import check_int
from hopformer.ops import dispatch, sparse_attention
from hopformer.ops.backend import Request
from hopformer.ops.combiner_attention import grouped_attention
from hopformer.ops.routing_attention import (
    QK_NORMS,
    causal_clustered_attention,
    clustered_attention,
    commitment_loss,
    nearest_centroid,
    nearest_with_error,
    normalise,
    rank,
)

UPDATES = ("auto", "manual")
EMA_EPS = 1e-5
INIT_TOKENS_PER_CLUSTER = 64  # tokens sampled per cluster for the k-means initialisation


@register("routing")
class RoutingAttention(AttentionModule):
    """Mixed local and routing heads (Routing Transformer).

    The first ``local_heads`` heads run blocked local attention, the others routing attention
    (:func:`hopformer.ops.routing`) on clusters kept by online k-means (module docstring).

    Args:
        dim, heads, dropout, bias: as :class:`~hopformer.attention.base.AttentionModule`.
        local_heads: heads of local attention; default ``heads // 2``; ``0 <= local_heads <= heads``.
        local_window: block length of the local heads: a block attends to itself and its
            neighbouring blocks (causal: itself up to the query and the previous block).
        clusters: k-means clusters per routing head. Default ``round(sqrt(max_seq_len))``: the
            centroids are persistent state, so their number is fixed at construction.
        window: members per cluster; default ``seq // clusters`` of each input (at least 1). Must
            not exceed the input length.
        max_seq_len: sets the default ``clusters`` and, when causal, the default ``window``.
        causal: strictly causal: local heads see their own block up to the query and the previous block;
            routing heads put each token in its nearest centroid's cluster and attend to the last
            ``window`` keys of that cluster before it and to itself (default window
            ``max_seq_len // clusters``, fixed, so the past never depends on the length; see
            :func:`hopformer.ops.routing_attention.causal_clustered_attention`).
        share_qk: routing heads use the query projection as keys; default ``causal``.
        qk_norm: ``"layernorm"`` (no affine) or ``"l2"``.
        decay: EMA decay of the k-means tables.
        commitment: weight of the commitment loss.
        kmeans_iters: k-means rounds of the data initialisation.
        update: ``"auto"`` or ``"manual"`` (see the module docstring).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        local_heads: int | None = None,
        local_window: int = 128,
        clusters: int | None = None,
        window: int | None = None,
        max_seq_len: int = 4096,
        causal: bool = False,
        share_qk: bool | None = None,
        qk_norm: str = "layernorm",
        decay: float = 0.999,
        commitment: float = 1e-4,
        kmeans_iters: int = 10,
        update: str = "auto",
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__(dim, heads, dropout=dropout, bias=bias)
        local_heads = heads // 2 if local_heads is None else local_heads
        check_int("local_heads", local_heads, 0, heads, allowed=f"between 0 and heads={heads}")
        check_int("local_window", local_window, 1)
        check_int("max_seq_len", max_seq_len, 1)
        clusters = max(1, round(math.sqrt(max_seq_len))) if clusters is None else clusters
        check_int("clusters", clusters, 1)
        if window is not None:
            check_int("window", window, 1, allowed="a positive integer or None")
        check_int("kmeans_iters", kmeans_iters, 0)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={qk_norm!r} is not known; choose one of {list(QK_NORMS)}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if not commitment >= 0.0:
            raise ValueError(f"commitment must be >= 0, got {commitment!r}")
        if update not in UPDATES:
            raise ValueError(f"update={update!r} is not known; choose one of {list(UPDATES)}")

        self.local_heads, self.routing_heads = local_heads, heads - local_heads
        self.local_window, self.clusters, self.window = local_window, clusters, window
        self.max_seq_len = max_seq_len
        self.causal = causal
        self.share_qk = causal if share_qk is None else bool(share_qk)
        self.qk_norm, self.decay, self.commitment = qk_norm, decay, commitment
        self.kmeans_iters, self.update = kmeans_iters, update
        self.radius = 1.0 if qk_norm == "l2" else math.sqrt(self.head_dim)

        shape = (self.routing_heads, clusters, self.head_dim)
        self.register_buffer("centroids", normalise(torch.randn(shape), qk_norm))
        self.register_buffer("ema_counts", torch.zeros(shape[:2]))
        self.register_buffer("ema_sums", torch.zeros(shape))
        self.register_buffer("initialised", torch.tensor(False))
        # Statistics recorded since the last EMA step: sums and counts side by side ``(H_r, C, d + 1)`` and the
        # number of forwards. Plain tensor attributes (moved with the module), not buffers: DDP's buffer broadcast
        # would otherwise overwrite every rank's statistics with rank 0's.
        self._pending = torch.zeros(*shape[:2], self.head_dim + 1)
        self._pending_batches = torch.zeros((), dtype=torch.int64)
        self._initialised_seen = False

    # ------------------------------------------------------------------------------------------
    # Forward

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        seq = q.shape[2]
        window = self.window if self.window is not None else max(1, seq // self.clusters)
        if self.causal:  # a fixed window: a token's keys must not depend on the sequence's length
            window = self._causal_window()
        elif window > seq:
            raise ValueError(f"window={window} is larger than the sequence length {seq}")
        dropout = self.dropout if self.training else 0.0
        outputs = []
        self.aux_loss = None
        # One split per tensor, not two slices: the backward of a split is one concatenation of the
        # heads' gradients, where each slice's backward would allocate a full-size zero gradient.
        heads = [self.local_heads, self.routing_heads]
        (q_local, q_route), (k_local, k_route), (v_local, v_route) = (x.split(heads, dim=1) for x in (q, k, v))
        if self.local_heads:
            outputs.append(
                local_attention(q_local, k_local, v_local, self.local_window, self.causal, key_padding_mask, dropout)
            )
        if self.routing_heads:
            keys = q_route if self.share_qk else k_route
            outputs.append(self._route(q_route, keys, v_route, window, key_padding_mask, dropout))
        return torch.cat(outputs, dim=1)

    def _route(self, q, k, v, window, padding, dropout):
        sources = [q] if self.share_qk else [q, k]
        members, assignments, errors = self._assign(sources, window, padding)
        # The loss before the attention: autograd runs its backward after the attention's, once the
        # attention's temporaries are freed (at 64K tokens that keeps its 96 MiB off Routing's peak).
        loss = sum(
            commitment_loss(x, self.centroids, assign, padding, self.qk_norm, error)
            for x, assign, error in zip(sources, assignments, errors)
        )
        self.aux_loss = self.commitment * loss
        if self.causal:
            return causal_clustered_attention(
                q, k, v, members[0], members[-1], window, padding, shared_qk=self.share_qk, dropout_p=dropout
            )
        return clustered_attention(
            q, k, v, members[0], members[-1], self.causal, padding, shared_qk=self.share_qk, dropout_p=dropout
        )

    def _assign(self, sources, window, padding) -> tuple[list[torch.Tensor], ...]:
        """Members, nearest-centroid assignments and commitment errors of the query (and key) tokens, with this
        forward's k-means bookkeeping (initialisation, EMA step, statistics) on the module's state. Under
        ``torch.compile`` one custom op that declares the state it updates (:func:`_kmeans_op`), so the compiled
        program keeps it; the errors are None there (the compiled loss recomputes them, fused)."""
        state = self._state()
        settings = dict(window=window, causal=self.causal, qk_norm=self.qk_norm, recording=self.training,
                        update_auto=self.update == "auto", decay=self.decay, radius=self.radius,
                        kmeans_iters=self.kmeans_iters)  # fmt: skip
        if torch.compiler.is_dynamo_compiling():
            key = sources[-1] if len(sources) > 1 else None
            members_q, members_k, assign_q, assign_k = torch.ops.hopformer.routing_kmeans(
                sources[0].detach(), None if key is None else key.detach(), padding, *state, **settings
            )
            if key is None:
                return [members_q], [assign_q], [None]
            return [members_q, members_k], [assign_q, assign_k], [None, None]
        known = self._initialised_seen
        members, assignments, errors = kmeans_step(
            [x.detach() for x in sources], padding, state, known_initialised=known, **settings
        )
        if self.training:
            self._is_initialised()  # reads the flag (a device sync) only until it is set
        return members, assignments, errors

    def _state(self) -> KMeansState:
        return KMeansState(
            self.centroids, self.ema_counts, self.ema_sums, self.initialised, self._pending, self._pending_batches
        )

    # ------------------------------------------------------------------------------------------
    # Decoding (causal only; hopformer.attention.decoding)

    def _causal_window(self) -> int:
        return self.window if self.window is not None else max(1, self.max_seq_len // self.clusters)

    def new_cache(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> RoutingCache:
        self._check_decoding()
        return RoutingCache.new(
            batch, self.local_heads, self.routing_heads, self.head_dim, self.local_window, self.clusters,
            self._causal_window(), device, dtype,
        )  # fmt: skip

    def _split(self, *tensors: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [x.split([self.local_heads, self.routing_heads], dim=1) for x in tensors]

    def _key_clusters(self, q_route: torch.Tensor, k_route: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = q_route if self.share_qk else k_route
        dtype = torch.promote_types(q_route.dtype, torch.float32)
        query = nearest_centroid(normalise(q_route.to(dtype), self.qk_norm), self.centroids)
        key = query if self.share_qk else nearest_centroid(normalise(keys.to(dtype), self.qk_norm), self.centroids)
        return query, key

    def prefill(self, q, k, v, key_padding_mask, cache: RoutingCache, lengths: torch.Tensor) -> torch.Tensor:
        out = self.attend(q, k, v, key_padding_mask)
        (q_local, q_route), (k_local, k_route), (v_local, v_route) = self._split(q, k, v)
        keys = q_route if self.share_qk else k_route
        with torch.no_grad():
            _, key_cluster = self._key_clusters(q_route, k_route)
        cache.fill(k_local, v_local, keys, v_route, key_cluster, lengths)
        return out

    def attend_step(self, q, k, v, cache: RoutingCache, positions: torch.Tensor) -> torch.Tensor:
        (q_local, q_route), (k_local, k_route), (v_local, v_route) = self._split(q, k, v)
        outputs = []
        if self.local_heads:
            cache.add_local(k_local, v_local, positions)
            outputs.append(cache.local_row(q_local, positions, self.local_window))
        if self.routing_heads:
            keys = q_route if self.share_qk else k_route
            query_cluster, key_cluster = self._key_clusters(q_route, k_route)
            outputs.append(cache.cluster_row(q_route, keys, v_route, query_cluster[..., 0], self.share_qk))
            cache.add_keys(keys, v_route, key_cluster[..., 0])
        return torch.cat(outputs, dim=1)

    # ------------------------------------------------------------------------------------------
    # K-means state

    def _apply(self, fn, recurse=True):
        # ``module.half()`` / ``.bfloat16()`` would make a 0.999-decay EMA stall (the increments
        # round away), so the k-means tables stay at least float32 whatever the module's dtype.
        super()._apply(fn, recurse)
        for name in ("centroids", "ema_counts", "ema_sums"):
            buffer = getattr(self, name)
            if buffer.dtype in (torch.float16, torch.bfloat16):
                setattr(self, name, buffer.float())
        self._pending = fn(self._pending).to(self.ema_counts.dtype)  # (plain attributes: moved here)
        self._pending_batches = fn(self._pending_batches)
        return self

    def _is_initialised(self) -> bool:
        # Read the buffer (a device sync) only until it is True; it never goes back to False.
        if not self._initialised_seen:
            self._initialised_seen = bool(self.initialised)
        return self._initialised_seen

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initialised_seen = False  # the loaded ``initialised`` decides again

    @property
    def pending_batches(self) -> int:
        """Forwards recorded since the last EMA step."""
        return int(self._pending_batches)

    @pending_batches.setter
    def pending_batches(self, value: int) -> None:
        self._pending_batches.fill_(value)

    @property
    def pending_counts(self) -> torch.Tensor | None:
        """Assignment counts recorded since the last EMA step ``(H_r, C)`` (None when nothing is recorded)."""
        return None if self.pending_batches == 0 else self._pending[..., -1]

    @pending_counts.setter
    def pending_counts(self, value: torch.Tensor | None) -> None:
        self._pending[..., -1] = 0.0 if value is None else value

    @property
    def pending_sums(self) -> torch.Tensor | None:
        """Sums of the assigned normalised vectors recorded since the last EMA step ``(H_r, C, d)``."""
        return None if self.pending_batches == 0 else self._pending[..., :-1]

    @pending_sums.setter
    def pending_sums(self, value: torch.Tensor | None) -> None:
        self._pending[..., :-1] = 0.0 if value is None else value

    @torch.no_grad()
    def update_centroids(self) -> None:
        """Apply the pending statistics as one EMA step (averaged over the recorded forwards)."""
        update_centroids(self._state(), self.decay, self.radius)

    def _record(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], padding: torch.Tensor | None) -> None:
        """Add one forward's assignment counts and sums (real tokens only) to the pending tables."""
        record_statistics(self._state(), pairs, padding)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, local_heads={self.local_heads}, local_window={self.local_window}, "
            f"clusters={self.clusters}, window={self.window}, causal={self.causal}, share_qk={self.share_qk}, "
            f"qk_norm={self.qk_norm!r}"
        )


class KMeansState(NamedTuple):
    """A Routing module's k-means state: the buffers, then the statistics recorded since the last EMA step."""

    centroids: torch.Tensor  # (H_r, C, d) on the sphere of the normalised vectors
    ema_counts: torch.Tensor  # (H_r, C)
    ema_sums: torch.Tensor  # (H_r, C, d)
    initialised: torch.Tensor  # bool, ()
    pending: torch.Tensor  # (H_r, C, d + 1): sums, then counts
    pending_batches: torch.Tensor  # int64, ()


@torch.no_grad()
def kmeans_step(
    sources: list[torch.Tensor],
    padding: torch.Tensor | None,
    state: KMeansState,
    *,
    window: int,
    causal: bool,
    qk_norm: str,
    recording: bool,
    update_auto: bool,
    decay: float,
    radius: float,
    kmeans_iters: int,
    known_initialised: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
    """Members, assignments and commitment errors of the tokens ``sources`` (queries, and keys unless shared) and,
    in a recording (training) forward that is not an activation recomputation, the k-means bookkeeping on
    ``state`` (see the module docstring). Normalised vectors in at least float32 rank the tokens and feed the
    statistics; they are made here and dropped. An error is None where the centroids moved after the ranking."""
    recording = recording and not _recomputing()
    dtype = torch.promote_types(sources[0].dtype, torch.float32)
    normalised = [normalise(x.to(dtype), qk_norm) for x in sources]
    first = recording and not known_initialised and not bool(state.initialised)
    if first and not causal:
        _initialise(state, normalised[0], normalised[-1], len(sources) == 1, padding, kmeans_iters, radius)
    elif recording and not first and update_auto:
        update_centroids(state, decay, radius)
    members, assignments, errors = [], [], []
    for x_norm in normalised:
        if causal:  # each token's nearest centroid: its own vector decides, nothing later does
            assign, error = nearest_with_error(x_norm, state.centroids)
            members.append(assign)
        else:
            index, assign, error = rank(x_norm, state.centroids, window, padding)
            members.append(index)
        assignments.append(assign)
        errors.append(error)
    if first and causal:  # after routing: this batch's own k-means must not reach its past
        _initialise(state, normalised[0], normalised[-1], len(sources) == 1, padding, kmeans_iters, radius)
        errors = [None] * len(errors)  # measured against the old centroids: the loss takes the new ones
    if recording:
        record_statistics(state, list(zip(normalised, assignments)), padding)
    return members, assignments, errors


def update_centroids(state: KMeansState, decay: float, radius: float) -> None:
    """Apply the pending statistics as one EMA step (averaged over the recorded forwards) and clear them;
    nothing changes when no forward was recorded. Tensor arithmetic throughout: no device sync."""
    batches = state.pending_batches
    recorded = batches > 0
    statistics = state.pending / batches.clamp_min(1)
    if _distributed():  # summed over ranks: the statistics of the global batch, as one process sees them
        dist.all_reduce(statistics)
    counts, sums = statistics[..., -1], statistics[..., :-1]
    ema_counts = state.ema_counts * decay + counts * (1.0 - decay)
    ema_sums = state.ema_sums * decay + sums * (1.0 - decay)
    mean = ema_sums / (ema_counts[..., None] + EMA_EPS)
    norm = mean.norm(dim=-1, keepdim=True)
    centroids = torch.where(norm > 1e-12, mean * (radius / norm.clamp_min(1e-12)), state.centroids)
    state.ema_counts.copy_(torch.where(recorded, ema_counts, state.ema_counts))
    state.ema_sums.copy_(torch.where(recorded, ema_sums, state.ema_sums))
    state.centroids.copy_(torch.where(recorded, centroids, state.centroids))
    state.pending.zero_()
    batches.zero_()


def record_statistics(
    state: KMeansState, pairs: list[tuple[torch.Tensor, torch.Tensor]], padding: torch.Tensor | None
) -> None:
    """Add one forward's assignment counts and sums (real tokens only) of each ``(x_norm, assignment)``
    ``(B, H_r, L, d), (B, H_r, L)`` to the pending tables."""
    heads, clusters, dim = state.centroids.shape
    pending = state.pending
    for x, assign in pairs:
        weight = torch.ones_like(assign, dtype=x.dtype) if padding is None else padding[:, None, :].to(x.dtype)
        weight = weight.expand_as(assign).transpose(0, 1).reshape(heads, -1)
        x = x.transpose(0, 1).reshape(heads, -1, dim)
        assign = assign.transpose(0, 1).reshape(heads, -1)
        pending[..., -1].scatter_add_(1, assign, weight.to(pending.dtype))
        index = assign[..., None].expand(-1, -1, dim)
        sums = torch.zeros_like(pending[..., :-1]).scatter_add_(1, index, (x * weight[..., None]).to(pending.dtype))
        pending[..., :-1] += sums
    state.pending_batches.add_(1)


def _initialise(
    state: KMeansState,
    q_norm: torch.Tensor,
    k_norm: torch.Tensor,
    shared: bool,
    padding: torch.Tensor | None,
    kmeans_iters: int,
    radius: float,
) -> None:
    """Spherical k-means on sampled normalised tokens of this batch (the first training batch)."""
    heads, clusters, dim = state.centroids.shape
    sources = [q_norm] if shared else [q_norm, k_norm]
    tokens = torch.cat([x.transpose(0, 1).reshape(heads, -1, dim) for x in sources], dim=1).float()
    if padding is not None:
        tokens = tokens[:, padding.reshape(-1).repeat(len(sources))]
    total = tokens.shape[1]
    if total == 0:  # nothing real to learn from: keep the random centroids, try again next batch
        return
    limit = clusters * INIT_TOKENS_PER_CLUSTER
    if total > limit:
        tokens = tokens[:, torch.randperm(total, device=tokens.device)[:limit]]
    count = tokens.shape[1]
    if count >= clusters:
        start = torch.randperm(count, device=tokens.device)[:clusters]
    else:
        start = torch.randint(count, (clusters,), device=tokens.device)
    centroids = tokens[:, start]
    counts = torch.zeros(heads, clusters, device=tokens.device)
    for _ in range(max(1, kmeans_iters)):
        assign = torch.einsum("hnd,hcd->hnc", tokens, centroids).argmax(-1)
        counts = torch.zeros_like(counts).scatter_add_(1, assign, torch.ones_like(assign, dtype=counts.dtype))
        sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(-1, -1, dim), tokens)
        norm = sums.norm(dim=-1, keepdim=True)
        centroids = torch.where(norm > 1e-12, sums * (radius / norm.clamp_min(1e-12)), centroids)
    # Start the EMA at this solution, with counts on the scale of one batch.
    counts = counts * (total / count)
    state.centroids.copy_(centroids)
    state.ema_counts.copy_(counts)
    state.ema_sums.copy_(centroids * counts[..., None])
    if _distributed():
        for buffer in (state.centroids, state.ema_counts, state.ema_sums):
            dist.broadcast(buffer, src=0)
    state.initialised.fill_(True)


@torch.library.custom_op(
    "hopformer::routing_kmeans",
    mutates_args=("centroids", "ema_counts", "ema_sums", "initialised", "pending", "pending_batches"),
)
def _kmeans_op(
    q: torch.Tensor,
    k: torch.Tensor | None,
    padding: torch.Tensor | None,
    centroids: torch.Tensor,
    ema_counts: torch.Tensor,
    ema_sums: torch.Tensor,
    initialised: torch.Tensor,
    pending: torch.Tensor,
    pending_batches: torch.Tensor,
    window: int,
    causal: bool,
    qk_norm: str,
    recording: bool,
    update_auto: bool,
    decay: float,
    radius: float,
    kmeans_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`kmeans_step` as one op for ``torch.compile``: ``(query members, key members, query assignments, key
    assignments)``; the key outputs are empty with shared QK. The state arguments are updated in place."""
    state = KMeansState(centroids, ema_counts, ema_sums, initialised, pending, pending_batches)
    sources = [q] if k is None else [q, k]
    members, assignments, _ = kmeans_step(
        sources, padding, state, window=window, causal=causal, qk_norm=qk_norm, recording=recording,
        update_auto=update_auto, decay=decay, radius=radius, kmeans_iters=kmeans_iters,
    )  # fmt: skip
    if causal:  # members are the assignments themselves: outputs must not alias each other
        members = [x.clone() for x in members]
    if k is None:
        empty = q.new_empty(0, dtype=torch.int64)
        return members[0], empty, assignments[0], empty.clone()
    return members[0], members[1], assignments[0], assignments[1]


@_kmeans_op.register_fake
def _(q, k, padding, centroids, ema_counts, ema_sums, initialised, pending, pending_batches, window, causal,
      qk_norm, recording, update_auto, decay, radius, kmeans_iters):  # fmt: skip
    batch, heads, seq, _ = q.shape
    assign = q.new_empty((batch, heads, seq), dtype=torch.int64)
    members = assign if causal else q.new_empty((batch, heads, centroids.shape[1], window), dtype=torch.int64)
    if k is None:
        empty = q.new_empty(0, dtype=torch.int64)
        return members.clone(), empty, assign.clone(), empty.clone()
    return members.clone(), members.clone(), assign.clone(), assign.clone()


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: int,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Blocked local attention: each block of ``block`` queries attends to its own block and the
    neighbouring blocks (causal: its own block up to the query and the previous block).

    On CUDA (no dropout, head_dim >= 16, ``block`` dividing 128 or a multiple of it) this is
    FlexAttention on the ``local(window=3)`` block graph: memory ``O(seq)``, no copies of k and v.
    Otherwise one batched SDPA over ``(batch, heads, blocks, block, 3 * block)``: memory
    ``O(seq * block)``.
    """
    batch, heads, seq, dim = q.shape
    block = min(block, seq)
    request = Request.of("sparse_attention", q, v, block_size=block, attention_dropout=dropout_p > 0)
    if dispatch.can_run("flex", request):  # flex's declared support says where it runs (CUDA)
        graph = _local_graph(seq, block, causal)
        return sparse_attention(q, k, v, graph, key_padding_mask, backend="flex", scale=dim**-0.5)
    blocks = -(-seq // block)
    padded = blocks * block
    real = torch.ones(batch, seq, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    if padded != seq:
        q, k, v = (F.pad(x, (0, 0, 0, padded - seq)) for x in (q, k, v))
        real = F.pad(real, (0, padded - seq), value=False)
    qb, kb, vb = (x.view(batch, heads, blocks, block, x.shape[-1]) for x in (q, k, v))
    rb = real.view(batch, blocks, block)

    def shifted(x: torch.Tensor, step: int, dim: int) -> torch.Tensor:  # block t sees block t + step
        edge = torch.zeros_like(x.narrow(dim, 0, 1))
        if step < 0:
            return torch.cat([edge, x.narrow(dim, 0, x.shape[dim] - 1)], dim)
        return torch.cat([x.narrow(dim, 1, x.shape[dim] - 1), edge], dim)

    steps = (-1,) if causal else (-1, 1)
    keys = torch.cat([kb] + [shifted(kb, s, 2) for s in steps], dim=3)
    values = torch.cat([vb] + [shifted(vb, s, 2) for s in steps], dim=3)
    own = rb[:, :, None, :]
    if causal:
        own = own & torch.ones(block, block, dtype=torch.bool, device=q.device).tril()
    neighbours = [shifted(rb, s, 1)[:, :, None, :].expand(-1, -1, block, -1) for s in steps]
    mask = torch.cat([own.expand(-1, -1, block, -1)] + neighbours, dim=-1)
    out = grouped_attention(qb, keys, values, mask, dim**-0.5, dropout_p).reshape(batch, heads, padded, -1)
    return (out * real[:, None, :, None].to(out.dtype))[:, :, :seq]


@functools.lru_cache(maxsize=16)
def _local_graph(seq: int, block: int, causal: bool):
    # Built once per shape: the graph caches its FlexAttention block mask.
    blocks = -(-seq // block)
    return graphs.local(seq, block, window=min(3, 2 * blocks - 1), causal=causal)


def _recomputing() -> bool:
    # Activation checkpointing (reentrant or not) re-runs the forward inside the autograd engine.
    return torch._C._current_graph_task_id() != -1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
