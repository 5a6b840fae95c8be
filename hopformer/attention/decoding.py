"""Incremental decoding: what each causal attention keeps of the past so that a new token costs its own row.

A cache is made per layer by ``module.new_cache(batch, max_len, device, dtype)``, filled by a forward pass over
the prompts (``module(x, mask, cache=cache)``: the ordinary outputs, plus what later tokens will need), then
extended one token per sequence at a time by ``module.step(x, cache, positions)`` (``positions``: each
sequence's own position, so prompts of different lengths decode together). Everything is preallocated for
``max_len`` positions: no step allocates a cache or plans anything anew. Per kind:

- :class:`KVCache` (full attention): every past key and value.
- :class:`GraphCache` (local, Longformer, BigBird, hypercube, grid, and Diffuser): causal graphs are
  prefix-stable, so the rows of the graph at ``max_len`` are the rows of every shorter one. A block is kept only
  while some later row can still reach it: each block gets a slot of a pool, and blocks whose last reader has
  passed give their slot to newer ones (a static plan, :func:`slot_plan`), so a local window's memory is the
  window's, however long the text. Diffuser keeps every hop state ``Z_0 = V, Z_1 .. Z_{K-1}`` of a position
  beside its key: past states never change under a causal, prefix-stable graph, so a new token computes its
  attention row once and each hop from its neighbours' cached states, ``O(degree x hops x head_dim)`` per token
  and layer.
- :class:`RoutingCache`: the local heads' last two blocks, and for the routing heads each cluster's last
  ``window`` keys and values (a ring per cluster), exactly the keys causal routing gives a new token.
- :class:`CombinerCache`: Combiner-Fixed keeps the current block's tokens and one summary per completed block
  (made when the block completes); the other variants keep every past query, key and value and recompute the
  new row exactly (correct, not incremental).

**Graph-safe steps.** A cache whose :func:`graph_safe` is True (:class:`KVCache`, :class:`GraphCache`) steps
without a host synchronisation and with the same shapes at every position (full attention masks the whole
preallocated length instead of slicing to the longest position), and a step is *idempotent*: running it twice
for the same token and positions leaves the cache as once. ``CausalLM.generate`` captures such steps in one CUDA
graph (it warms up by running the first step, so that step may run more than once). Routing and Combiner caches
read counters and completed blocks on the host and decode eagerly. Within one step the layers share what depends
on the positions alone (:func:`shared_step_indices`): neighbour indices and masks are derived once, not per layer.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from hopformer.graphs import BlockGraph
from hopformer.ops.common import masked_softmax


def scatter_positions(buffer: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``buffer[b, :, index[b]] = values[b, :, 0]`` for every sequence ``b``: one new entry each (``buffer`` may
    be a view, e.g. some channels of a pool)."""
    batch = buffer.shape[0]
    buffer.scatter_(2, index.view(batch, 1, 1, 1).expand(values.shape), values)


def gather_positions(buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``buffer[b, :, index[b, j]]`` for every ``b`` and ``j``: ``(batch, heads, len(index[b]), dim)``."""
    batch, heads, _, dim = buffer.shape
    return buffer.gather(2, index[:, None, :, None].expand(batch, heads, index.shape[1], dim))


def graph_safe(cache: Any) -> bool:
    """Whether ``cache``'s decoding step can be captured in a CUDA graph: no host synchronisation, the same
    shapes at every position, and idempotent (see the module docstring)."""
    return bool(getattr(cache, "graph_safe", False))


def reorder_caches(caches: list[Any], index: torch.Tensor) -> None:
    """Keep sequence ``index[b]``'s cache in row ``b``, for every cache (beam search). Every tensor a cache holds
    directly is batch-first (its plan, a :class:`SlotPlan`, is shared); rows are copied in place, so a CUDA graph
    captured on the caches stays valid."""
    for cache in caches:
        for value in vars(cache).values():
            if isinstance(value, torch.Tensor):
                value.copy_(value.index_select(0, index.to(value.device)))


# What every layer of one decoding step derives alike from the new tokens' positions (neighbour indices, masks):
# within :func:`shared_step_indices` the first layer's is kept for the others.
_STEP_INDICES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("hopformer_step_indices", default=None)


@contextlib.contextmanager
def shared_step_indices() -> Iterator[None]:
    """Within this block, decoding steps at the same ``positions`` tensor share one derivation of what depends
    on the positions alone (``TransformerEncoder.step`` wraps its layers in it)."""
    if torch.compiler.is_compiling():  # a traced step derives them per layer (the compiler shares them)
        yield
        return
    token = _STEP_INDICES.set({})
    try:
        yield
    finally:
        _STEP_INDICES.reset(token)


def _shared(key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, once per ``key`` within :func:`shared_step_indices` (keys hold ids of objects alive for the
    whole step: the positions tensor, a plan)."""
    memo = None if torch.compiler.is_compiling() else _STEP_INDICES.get()
    if memo is None:
        return make()
    if key not in memo:
        memo[key] = make()
    return memo[key]


def score_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``allowed (B, M)`` as an additive bias ``(B, 1, 1, M)`` in ``dtype``: 0 where allowed, the lowest finite
    value elsewhere (so a softmax gives exactly 0 there, as :func:`masked_softmax` does, in one pass)."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None, None, :]


def attention_probs(q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q keys^T / sqrt(d) + bias)`` of one query per sequence, ``(B, H, 1, M)`` in ``q``'s dtype, the
    softmax in ``bias``'s dtype (float32 or better). Every row needs an allowed key (else it comes out uniform)."""
    scores = torch.add(bias, torch.matmul(q, keys.transpose(-1, -2)), alpha=q.shape[-1] ** -0.5)
    return scores.softmax(-1).to(q.dtype)


def attend_row(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """One query per sequence against its gathered keys: ``q (B, H, 1, d)``, ``keys (B, H, M, d)``, ``allowed
    (B, 1 or H, M)`` -> ``(B, H, 1, dv)``. Softmax in float32 or better, as the training paths compute it."""
    scores = torch.matmul(q, keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = masked_softmax(scores.to(torch.promote_types(q.dtype, torch.float32)), allowed[:, :, None, :])
    return torch.matmul(probs.to(values.dtype), values)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------------------------------- full
@dataclass
class KVCache:
    """Every past key and value of full attention: ``(batch, heads, max_len, head_dim)`` each."""

    k: torch.Tensor
    v: torch.Tensor
    graph_safe: ClassVar[bool] = True

    @classmethod
    def new(cls, batch: int, heads: int, head_dim: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch, heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[:, :, : k.shape[2]] = k
        self.v[:, :, : v.shape[2]] = v

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        scatter_positions(self.k, positions, k)
        scatter_positions(self.v, positions, v)
        # the whole preallocated length under a mask: the same shapes at every position and no host sync (slicing
        # to the longest position would need one); later positions get probability exactly 0
        length, dtype = self.k.shape[2], _compute_dtype(q.dtype)

        def mask() -> torch.Tensor:
            return score_bias(torch.arange(length, device=q.device)[None, :] <= positions[:, None], dtype)

        bias = _shared(("kv", length, id(positions), dtype), mask)
        return torch.matmul(attention_probs(q, self.k, bias), self.v)


# ------------------------------------------------------------------------------------------ graphs
@dataclass(frozen=True)
class StepIndex:
    """Where the new tokens at ``positions (B,)`` read and write in a :class:`GraphCache` (``M = width *
    block_size`` key positions a row lists): ``index (B, M)`` their pool indices, ``allowed (B, M)`` which of
    them each token may use, ``own (B, M)`` which is the token itself, ``at (B,)`` its own pool index;
    ``bias (B, 1, 1, M)`` the mask as an additive score bias and ``own_column (B, 1, 1, 1)`` where ``own`` is,
    both None unless every row of the graph lists its own block."""

    index: torch.Tensor
    allowed: torch.Tensor
    own: torch.Tensor
    at: torch.Tensor
    bias: torch.Tensor | None
    own_column: torch.Tensor | None


@dataclass(frozen=True)
class SlotPlan:
    """Where each block of a causal graph lives while it can still be reached (see :func:`slot_plan`).

    ``rows (num_blocks, width)``: each row's key blocks, -1 padded. ``slot (num_blocks,)``: the pool slot of
    each block. ``slots``: how many slots the pool needs (the most blocks alive at once). ``self_loops``: every
    row lists its own block (true of every causal pattern here), so a new token always has a key: itself."""

    block_size: int
    rows: torch.Tensor
    slot: torch.Tensor
    slots: int
    self_loops: bool = False

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> StepIndex:
        """The :class:`StepIndex` of the new tokens at ``positions (B,)``, its bias in ``dtype``. Tensor
        arithmetic only (no host sync); shared by the layers of one step under :func:`shared_step_indices`."""
        return _shared(("plan", id(self), id(positions), dtype), lambda: self._lookup(positions, dtype))

    def _lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> StepIndex:
        bs = self.block_size
        row = positions // bs
        at = self.slot[row] * bs + positions % bs
        blocks = self.rows[row]  # (B, width), -1 padded
        offsets = torch.arange(bs, device=positions.device)
        key_positions = (blocks[:, :, None] * bs + offsets).flatten(1)  # negative for padding blocks
        index = (self.slot[blocks.clamp(min=0)][:, :, None] * bs + offsets).flatten(1)
        allowed = (key_positions >= 0) & (key_positions <= positions[:, None])
        own = key_positions == positions[:, None]
        if not self.self_loops:
            return StepIndex(index, allowed, own, at, None, None)
        own_column = own.to(torch.uint8).argmax(-1)[:, None, None, None]
        return StepIndex(index, allowed, own, at, score_bias(allowed, dtype), own_column)


def slot_plan(graph: BlockGraph, device: torch.device) -> SlotPlan:
    """Give every block a pool slot for the rows during which it can be reached (from its own row to the last
    row that lists it); a block that no later row can reach gives its slot to the next block (greedy colouring
    of intervals, optimal). Cached on the graph."""
    key = ("decode_plan", str(device))
    if key in graph.cache:
        return graph.cache[key]
    if not graph.is_causal:
        raise ValueError("incremental decoding needs a causal graph (build the attention with causal=True)")
    lists = graph.block_lists()
    last_reader = list(range(graph.num_blocks))
    for row, blocks in enumerate(lists):
        for block in blocks:
            last_reader[block] = max(last_reader[block], row)
    slot, free, live = [0] * graph.num_blocks, [], []  # live: (last reader, slot)
    count = 0
    for block in range(graph.num_blocks):
        live.sort()
        while live and live[0][0] < block:  # readers all passed: the slot is free again
            free.append(live.pop(0)[1])
        if free:
            slot[block] = free.pop()
        else:
            slot[block], count = count, count + 1
        live.append((last_reader[block], slot[block]))
    width = max(len(blocks) for blocks in lists)
    rows = torch.full((graph.num_blocks, width), -1, dtype=torch.long)
    for row, blocks in enumerate(lists):
        rows[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
    self_loops = all(row in blocks for row, blocks in enumerate(lists))
    plan = SlotPlan(graph.block_size, rows.to(device), torch.tensor(slot, device=device), count, self_loops)
    graph.cache[key] = plan
    return plan


@dataclass
class GraphCache:
    """Keys and value states of the blocks a causal graph can still reach, in a pool of slots.

    ``pools``: ``(batch, heads, slots * block_size, (1 + states) * head_dim)``: per position its key, then one
    value state per hop state a later token reads (``Z_0 = V``; 1 state for sparse attention, ``hops`` for
    Diffuser), side by side, so that one gather reads them all at a new token's neighbours. ``k`` and
    ``states[t]`` are views of it.
    """

    plan: SlotPlan
    pools: torch.Tensor
    head_dim: int
    graph_safe: ClassVar[bool] = True

    @classmethod
    def new(cls, plan: SlotPlan, batch: int, heads: int, head_dim: int, num_states: int, device, dtype) -> GraphCache:
        shape = (batch, heads, plan.slots * plan.block_size, (1 + num_states) * head_dim)
        return cls(plan, torch.zeros(shape, device=device, dtype=dtype), head_dim)

    @property
    def k(self) -> torch.Tensor:
        """The keys ``(batch, heads, slots * block_size, head_dim)`` (a view)."""
        return self.pools[..., : self.head_dim]

    @property
    def states(self) -> list[torch.Tensor]:
        """The value states ``Z_0 = V, Z_1 ...``, each ``(batch, heads, slots * block_size, head_dim)`` (views)."""
        d = self.head_dim
        return [self.pools[..., t * d : (t + 1) * d] for t in range(1, self.pools.shape[-1] // d)]

    def _pool_index(self, positions: torch.Tensor) -> torch.Tensor:
        bs = self.plan.block_size
        return self.plan.slot[positions // bs] * bs + positions % bs

    def fill(self, k: torch.Tensor, states: list[torch.Tensor], lengths: torch.Tensor) -> None:
        """Store the prompts' keys and states: only the blocks the next token of each sequence can still reach
        (their slots are distinct; earlier blocks that gave up their slot are left out)."""
        bs, seq = self.plan.block_size, k.shape[2]
        positions = torch.arange(seq, device=k.device)
        blocks = positions // bs
        # a block is kept if a row at or after the next token's reads it: its last reader is that late
        last = _last_reader(self.plan)[blocks]  # (seq,)
        keep = (last[None, :] >= (lengths[:, None] // bs)) & (positions[None, :] < lengths[:, None])  # (B, seq)
        index = self._pool_index(positions)
        entries = torch.cat([k, *states], dim=-1)  # (B, H, seq, (1 + states) * d), as the pool lays them out
        for b in range(k.shape[0]):
            kept = keep[b]
            self.pools[b, :, index[kept]] = entries[b, :, kept]

    def neighbours(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool indices ``(B, width * block_size)`` of each new token's keys, and which of them it may use."""
        where = self.plan.lookup(positions)
        return where.index, where.allowed

    def step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, steps: list[float]
    ) -> list[torch.Tensor]:
        """The new token's states ``z_1 .. z_T`` (the last is its output): sparse attention (``steps=[0.0]``)
        or the power iteration over the cached states, ``z_t = lerp(A z_{t-1}, v, a_t)``; its own states are
        stored for later tokens."""
        d, hops = self.head_dim, len(steps)
        where = self.plan.lookup(positions, _compute_dtype(q.dtype))
        scatter_positions(self.pools[..., : 2 * d], where.at, torch.cat([k, v], dim=-1))
        gathered = gather_positions(self.pools, where.index)  # (B, H, M, (1 + T) d): keys and every state at once
        keys = gathered[..., :d]
        if where.bias is not None:
            probs = attention_probs(q, keys, where.bias)
        else:  # a row may have no key at all: it gets zeros
            scores = torch.matmul(q, keys.transpose(-1, -2)) * d**-0.5
            probs = masked_softmax(scores.to(_compute_dtype(q.dtype)), where.allowed[:, None, None, :]).to(q.dtype)
        if hops == 1:  # one hop: attention over the gathered values, the new token's own included
            a = steps[0]
            attended = torch.matmul(probs, gathered[..., d : 2 * d])
            return [v if a >= 1.0 else attended if a == 0.0 else torch.lerp(attended, v, a)]
        # Hop t reads Z_t of every neighbour. The others' states are final (prefix-stable causal graph), so all
        # hops' sums over them are one product; the new token's own Z_t is made here (its pool entry is stale
        # until stored), so its share is added apart: A z_t = others' part + p_own * z_t.
        own = where.own[:, None, None, :]
        if where.own_column is not None:
            own_share = probs.gather(-1, where.own_column.expand(*probs.shape[:-1], 1))  # (B, H, 1, 1)
        else:
            own_share = (probs * own).sum(-1, keepdim=True)
        batch, heads = probs.shape[:2]
        others = torch.matmul(probs.masked_fill(own, 0.0), gathered[..., d:]).view(batch, heads, 1, hops, d)
        state, states = v, []
        if max(steps) - min(steps) < 1e-12 and steps[0] < 1.0:  # PPR (and learned weights): one rate for all
            a = steps[0]  # (PPR's rates are alpha up to rounding)
            base = others if a == 0.0 else torch.lerp(others, v[:, :, :, None, :], a)  # (1 - a) others + a v
            rate = own_share if a == 0.0 else own_share * (1.0 - a)
            for hop in range(hops):
                state = torch.addcmul(base[..., hop, :], rate, state)
                states.append(state)
        else:  # a rate per hop (heat kernel, renormalised remainders; 1 resets the state to v)
            for hop, a in enumerate(steps):
                if a >= 1.0:
                    state = v
                else:
                    attended = torch.addcmul(others[..., hop, :], own_share, state)
                    state = attended if a == 0.0 else torch.lerp(attended, v, a)
                states.append(state)
        # Z_1 .. Z_{T-1} of the new token, read by later tokens (Z_T is the output only)
        scatter_positions(self.pools[..., 2 * d :], where.at, torch.cat(states[:-1], dim=-1))
        return states


def _last_reader(plan: SlotPlan) -> torch.Tensor:
    rows = plan.rows
    readers = torch.arange(rows.shape[0], device=rows.device)[:, None].expand_as(rows)
    last = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    valid = rows >= 0
    return last.scatter_reduce(0, rows[valid], readers[valid], reduce="amax", include_self=True)


# ----------------------------------------------------------------------------------------- routing
@dataclass
class RoutingCache:
    """Causal routing's past: the local heads' last two blocks of keys and values (a ring of ``2 * block``
    positions) and, per routing head and cluster, the last ``window`` keys and values of that cluster (a ring
    per cluster; ``count`` keys have joined each)."""

    local_k: torch.Tensor  # (B, H_local, 2 * block, d)
    local_v: torch.Tensor
    ring_k: torch.Tensor  # (B, H_route, clusters, window, d)
    ring_v: torch.Tensor
    count: torch.Tensor  # (B, H_route, clusters)

    @classmethod
    def new(cls, batch, local_heads, routing_heads, head_dim, block, clusters, window, device, dtype) -> RoutingCache:
        local = (batch, local_heads, 2 * block, head_dim)
        ring = (batch, routing_heads, clusters, window, head_dim)

        def zeros(shape):
            return torch.zeros(shape, device=device, dtype=dtype)

        count = torch.zeros(batch, routing_heads, clusters, dtype=torch.long, device=device)
        return cls(zeros(local), zeros(local), zeros(ring), zeros(ring), count)

    def add_local(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        at = positions % self.local_k.shape[2]
        scatter_positions(self.local_k, at, k)
        scatter_positions(self.local_v, at, v)

    def local_row(self, q: torch.Tensor, positions: torch.Tensor, block: int) -> torch.Tensor:
        """Blocked local attention of the new token: its own block up to itself and the whole previous block."""
        span = self.local_k.shape[2]
        start = (positions // block - 1) * block  # (B,)
        key_positions = start[:, None] + torch.arange(span, device=q.device)  # (B, 2 * block)
        allowed = (key_positions >= 0) & (key_positions <= positions[:, None])
        index = key_positions.clamp(min=0) % span
        keys, values = gather_positions(self.local_k, index), gather_positions(self.local_v, index)
        return attend_row(q, keys, values, allowed[:, None])

    def cluster_row(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_cluster: torch.Tensor, shared_qk: bool
    ) -> torch.Tensor:
        """The new token against the last ``window`` keys of its cluster before it, and itself (with shared QK
        itself only when the cluster has no earlier key)."""
        batch, heads, clusters, window, dim = self.ring_k.shape
        pick = query_cluster.view(batch, heads, 1, 1, 1).expand(batch, heads, 1, window, dim)
        keys = self.ring_k.gather(2, pick)[:, :, 0]  # (B, H, window, d)
        values = self.ring_v.gather(2, pick)[:, :, 0]
        filled = self.count.gather(2, query_cluster.view(batch, heads, 1))  # (B, H, 1)
        allowed = torch.arange(window, device=q.device)[None, None, :] < filled
        self_allowed = ~allowed.any(-1, keepdim=True) if shared_qk else torch.ones_like(allowed[..., :1])
        keys, values = torch.cat([keys, k[:, :, 0:1]], 2), torch.cat([values, v[:, :, 0:1]], 2)
        allowed = torch.cat([allowed, self_allowed], -1)  # (B, H, window + 1)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * dim**-0.5
        probs = masked_softmax(scores.to(torch.promote_types(q.dtype, torch.float32)), allowed[:, :, None, :])
        return torch.matmul(probs.to(values.dtype), values)

    def add_keys(self, k: torch.Tensor, v: torch.Tensor, key_cluster: torch.Tensor) -> None:
        """The new token's key joins its cluster's ring, replacing the oldest once the ring is full."""
        batch, heads, clusters, window, dim = self.ring_k.shape
        filled = self.count.gather(2, key_cluster.view(batch, heads, 1)).view(batch, heads)
        flat = (key_cluster * window + filled % window).view(batch, heads, 1, 1).expand(batch, heads, 1, dim)
        self.ring_k.view(batch, heads, clusters * window, dim).scatter_(2, flat, k)
        self.ring_v.view(batch, heads, clusters * window, dim).scatter_(2, flat, v)
        self.count.scatter_add_(2, key_cluster.view(batch, heads, 1), torch.ones_like(filled)[..., None])

    def fill(self, k_local, v_local, k_route, v_route, key_cluster, lengths: torch.Tensor) -> None:
        """Store the prompts' past the way :meth:`add_local` and :meth:`add_keys` would have, token by token."""
        batch, seq = k_route.shape[0], k_route.shape[2]
        positions = torch.arange(seq, device=k_route.device)
        span = self.local_k.shape[2]
        for b in range(batch):
            length = int(lengths[b])
            recent = positions[max(0, length - span) : length]
            self.local_k[b, :, recent % span] = k_local[b, :, recent]
            self.local_v[b, :, recent % span] = v_local[b, :, recent]
            clusters, window = self.ring_k.shape[2], self.ring_k.shape[3]
            assign = key_cluster[b, :, :length]  # (H, length)
            one_hot = F.one_hot(assign, clusters)  # (H, length, C)
            rank = (one_hot.cumsum(1) - one_hot).gather(2, assign[..., None])[..., 0]  # earlier keys of the cluster
            total = one_hot.sum(1)  # (H, C)
            self.count[b] = total
            kept = rank >= total.gather(1, assign) - window  # (H, length): among the cluster's last `window`
            for h in range(assign.shape[0]):
                where = kept[h]
                self.ring_k[b, h, assign[h, where], rank[h, where] % window] = k_route[b, h, :length][where]
                self.ring_v[b, h, assign[h, where], rank[h, where] % window] = v_route[b, h, :length][where]


# ----------------------------------------------------------------------------------------- combiner
@dataclass
class CombinerCache:
    """Combiner's past. ``fixed``: the current block's queries, keys and values, and for every completed block
    its summary (key, value, and whether it had a real token). Other variants: every past query, key and value
    (``q``, ``k``, ``v`` hold ``max_len`` positions), and the new row is recomputed from them."""

    block: int
    q: torch.Tensor  # fixed: (B, H, block, d); others: (B, H, max_len, d)
    k: torch.Tensor
    v: torch.Tensor
    summary_k: torch.Tensor | None = None  # fixed: (B, H, blocks, d)
    summary_v: torch.Tensor | None = None
    summary_ok: torch.Tensor | None = None  # (B, blocks) bool

    @classmethod
    def new(cls, variant: str, block: int, batch: int, heads: int, head_dim: int, max_len: int, device, dtype):
        def zeros(*shape, kind=dtype):
            return torch.zeros(*shape, device=device, dtype=kind)

        if variant != "fixed":
            return cls(block, *(zeros(batch, heads, max_len, head_dim) for _ in range(3)))
        blocks = -(-max_len // block)
        buffers = (zeros(batch, heads, block, head_dim) for _ in range(3))
        summaries = zeros(batch, heads, blocks, head_dim), zeros(batch, heads, blocks, head_dim)
        return cls(block, *buffers, *summaries, zeros(batch, blocks, kind=torch.bool))

    @property
    def fixed(self) -> bool:
        return self.summary_k is not None

    def fill_fixed(self, q, k, v, lengths: torch.Tensor, scale: float) -> None:
        """The prompts' completed blocks as summaries, and their current block's tokens."""
        s = self.block
        for b in range(q.shape[0]):
            length = int(lengths[b])
            done = length // s
            if done:
                blocks = [x[b : b + 1, :, : done * s].unflatten(2, (done, s)) for x in (q, k, v)]
                self._summarise(b, slice(0, done), *blocks, scale)
            current = slice(done * s, length)
            for buffer, x in ((self.q, q), (self.k, k), (self.v, v)):
                buffer[b, :, : length - done * s] = x[b, :, current]

    def _summarise(self, b: int, where, qb, kb, vb, scale: float) -> None:
        """Summaries of whole blocks ``(1, H, n, s, d)`` of sequence ``b`` into ``where`` (the region of
        Combiner-Fixed: max-pooled key and query, value by the query's softmax over the block's keys)."""
        from hopformer.ops.combiner_attention import _region_summaries

        key, value, _ = _region_summaries(qb, kb, vb, None, scale)
        self.summary_k[b, :, where] = key[0]
        self.summary_v[b, :, where] = value[0]
        self.summary_ok[b, where] = True

    def step_fixed(self, q, k, v, positions: torch.Tensor, scale: float) -> torch.Tensor:
        """Combiner-Fixed for the new token: its block up to itself and the summaries of earlier blocks, under
        one softmax; a block that this token completes is summarised for the tokens after it."""
        s = self.block
        offset, current = positions % s, positions // s
        for buffer, x in ((self.q, q), (self.k, k), (self.v, v)):
            scatter_positions(buffer, offset, x)
        direct = torch.arange(s, device=q.device)[None, :] <= offset[:, None]  # (B, s)
        earlier = torch.arange(self.summary_k.shape[2], device=q.device)[None, :] < current[:, None]
        keys = torch.cat([self.k, self.summary_k], 2)
        values = torch.cat([self.v, self.summary_v], 2)
        allowed = torch.cat([direct, earlier & self.summary_ok], 1)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
        probs = masked_softmax(scores.to(torch.promote_types(q.dtype, torch.float32)), allowed[:, None, None, :])
        out = torch.matmul(probs.to(values.dtype), values)
        for b in torch.nonzero(offset == s - 1).flatten().tolist():  # blocks completed by this token
            blocks = [x[b : b + 1, :, None] for x in (self.q, self.k, self.v)]  # (1, H, 1, s, d)
            self._summarise(b, slice(int(current[b]), int(current[b]) + 1), *blocks, scale)
        return out
