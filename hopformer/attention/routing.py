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
        # Statistics recorded since the last EMA step. Plain attributes, not buffers: DDP's buffer
        # broadcast would otherwise overwrite every rank's statistics with rank 0's.
        self.pending_counts: torch.Tensor | None = None
        self.pending_sums: torch.Tensor | None = None
        self.pending_batches = 0
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
        recording = self.training and not _recomputing()
        sources = [q] if self.share_qk else [q, k]
        members, assignments = [], []
        # Normalised vectors in at least float32 rank the tokens and feed the k-means statistics. They
        # are made here without gradient and dropped before the attention; the commitment loss
        # recomputes them in its backward.
        with torch.no_grad():
            dtype = torch.promote_types(q.dtype, torch.float32)
            normalised = [normalise(x.to(dtype), self.qk_norm) for x in sources]
            first = recording and not self._is_initialised()
            if first and not self.causal:
                self._initialise(normalised[0], normalised[-1], padding)
            elif recording and not first and self.update == "auto":
                self.update_centroids()
            for x_norm in normalised:
                if self.causal:  # each token's nearest centroid: its own vector decides, nothing later does
                    assign = nearest_centroid(x_norm, self.centroids)
                    members.append(assign)
                else:
                    index, assign = rank(x_norm, self.centroids, window, padding)
                    members.append(index)
                assignments.append(assign)
            if first and self.causal:  # after routing: this batch's own k-means must not reach its past
                self._initialise(normalised[0], normalised[-1], padding)
            if recording:
                self._record(list(zip(normalised, assignments)), padding)
            del normalised
        # The loss before the attention: autograd runs its backward after the attention's, once the
        # attention's temporaries are freed (at 64K tokens that keeps its 96 MiB off Routing's peak).
        loss = sum(
            commitment_loss(x, self.centroids, assign, padding, self.qk_norm) for x, assign in zip(sources, assignments)
        )
        self.aux_loss = self.commitment * loss
        if self.causal:
            return causal_clustered_attention(
                q, k, v, members[0], members[-1], window, padding, shared_qk=self.share_qk, dropout_p=dropout
            )
        return clustered_attention(
            q, k, v, members[0], members[-1], self.causal, padding, shared_qk=self.share_qk, dropout_p=dropout
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
        return self

    def _is_initialised(self) -> bool:
        # Read the buffer (a device sync) only until it is True; it never goes back to False.
        if not self._initialised_seen:
            self._initialised_seen = bool(self.initialised)
        return self._initialised_seen

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initialised_seen = False  # the loaded ``initialised`` decides again

    @torch.no_grad()
    def update_centroids(self) -> None:
        """Apply the pending statistics as one EMA step (averaged over the recorded forwards)."""
        batches = self.pending_batches
        if batches == 0:
            return
        counts = self.pending_counts / batches
        sums = self.pending_sums / batches
        if _distributed():  # summed over ranks: the statistics of the global batch, as one process sees them
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_counts.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_sums.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        mean = self.ema_sums / (self.ema_counts[..., None] + EMA_EPS)
        norm = mean.norm(dim=-1, keepdim=True)
        self.centroids.copy_(torch.where(norm > 1e-12, mean * (self.radius / norm.clamp_min(1e-12)), self.centroids))
        self.pending_counts = self.pending_sums = None
        self.pending_batches = 0

    def _record(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], padding: torch.Tensor | None) -> None:
        """Add one forward's assignment counts and sums (real tokens only) to the pending tables."""
        for x, assign in pairs:
            counts, sums = self._statistics(x, assign, padding)
            if self.pending_counts is None:
                self.pending_counts, self.pending_sums = torch.zeros_like(counts), torch.zeros_like(sums)
            self.pending_counts.add_(counts)
            self.pending_sums.add_(sums)
        self.pending_batches += 1

    def _statistics(self, x, assign, padding) -> tuple[torch.Tensor, torch.Tensor]:
        # x (B, H_r, L, d), assign (B, H_r, L) -> counts (H_r, C), sums (H_r, C, d)
        heads, dim = self.routing_heads, self.head_dim
        weight = torch.ones_like(assign, dtype=x.dtype) if padding is None else padding[:, None, :].to(x.dtype)
        weight = weight.expand_as(assign)
        x = x.transpose(0, 1).reshape(heads, -1, dim)
        assign = assign.transpose(0, 1).reshape(heads, -1)
        weight = weight.transpose(0, 1).reshape(heads, -1)
        counts = self.ema_counts.new_zeros(self.ema_counts.shape).scatter_add_(1, assign, weight.to(self.ema_counts))
        index = assign[..., None].expand(-1, -1, dim)
        sums = self.ema_sums.new_zeros(self.ema_sums.shape).scatter_add_(
            1, index, (x * weight[..., None]).to(self.ema_sums)
        )
        return counts, sums

    def _initialise(self, q_norm: torch.Tensor, k_norm: torch.Tensor, padding: torch.Tensor | None) -> None:
        """Spherical k-means on sampled normalised tokens of this batch (the first training batch)."""
        heads, dim = self.routing_heads, self.head_dim
        sources = [q_norm] if self.share_qk else [q_norm, k_norm]
        tokens = torch.cat([x.transpose(0, 1).reshape(heads, -1, dim) for x in sources], dim=1).float()
        if padding is not None:
            tokens = tokens[:, padding.reshape(-1).repeat(len(sources))]
        total = tokens.shape[1]
        if total == 0:  # nothing real to learn from: keep the random centroids, try again next batch
            return
        limit = self.clusters * INIT_TOKENS_PER_CLUSTER
        if total > limit:
            tokens = tokens[:, torch.randperm(total, device=tokens.device)[:limit]]
        count = tokens.shape[1]
        if count >= self.clusters:
            start = torch.randperm(count, device=tokens.device)[: self.clusters]
        else:
            start = torch.randint(count, (self.clusters,), device=tokens.device)
        centroids = tokens[:, start]
        counts = torch.zeros(heads, self.clusters, device=tokens.device)
        for _ in range(max(1, self.kmeans_iters)):
            assign = torch.einsum("hnd,hcd->hnc", tokens, centroids).argmax(-1)
            counts = torch.zeros_like(counts).scatter_add_(1, assign, torch.ones_like(assign, dtype=counts.dtype))
            sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(-1, -1, dim), tokens)
            norm = sums.norm(dim=-1, keepdim=True)
            centroids = torch.where(norm > 1e-12, sums * (self.radius / norm.clamp_min(1e-12)), centroids)
        # Start the EMA at this solution, with counts on the scale of one batch.
        counts = counts * (total / count)
        self.centroids.copy_(centroids)
        self.ema_counts.copy_(counts)
        self.ema_sums.copy_(centroids * counts[..., None])
        if _distributed():
            for buffer in (self.centroids, self.ema_counts, self.ema_sums):
                dist.broadcast(buffer, src=0)
        self.initialised.fill_(True)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, local_heads={self.local_heads}, local_window={self.local_window}, "
            f"clusters={self.clusters}, window={self.window}, causal={self.causal}, share_qk={self.share_qk}, "
            f"qk_norm={self.qk_norm!r}"
        )


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
