"""BlockGraph and the pattern constructors."""

import math

import pytest
import torch

import hopformer.graphs as G

LENGTHS = [1, 63, 64, 65, 200, 513]


def _dense_from_blocks(graph):
    """Token mask rebuilt independently from the block lists."""
    dense = torch.zeros(graph.seq_len, graph.seq_len, dtype=torch.bool)
    bs = graph.block_size
    for qb, keys in enumerate(graph.block_lists()):
        for kb in keys:
            dense[qb * bs : (qb + 1) * bs, kb * bs : (kb + 1) * bs] = True
    return dense.tril() if graph.is_causal else dense


def _all_patterns(seq_len, block_size=16):
    nb = math.ceil(seq_len / block_size)
    window = 3 if nb >= 2 else 1
    return [
        G.full(seq_len, block_size),
        G.local(seq_len, block_size, window=window),
        G.longformer(seq_len, block_size, window=window, num_global=min(1, nb)),
        G.bigbird(seq_len, block_size, window=window, num_global=min(2, nb), num_random=2, seed=3),
        G.diffuser(seq_len, block_size, window=window, num_global=min(2, nb - 1), num_random=2, seed=3),
        G.hypercube(seq_len, block_size),
        G.grid2d(seq_len, side=9, radius=1, num_random=2, seed=3),
    ]


@pytest.mark.parametrize("seq_len", LENGTHS)
def test_block_lists_sorted_and_dense_consistent(seq_len):
    for graph in _all_patterns(seq_len):
        lists = graph.block_lists()
        assert len(lists) == graph.num_blocks == math.ceil(seq_len / graph.block_size)
        for keys in lists:
            assert keys == sorted(set(keys))
            assert all(0 <= kb < graph.num_blocks for kb in keys)
        dense = graph.to_dense()
        assert dense.shape == (seq_len, seq_len) and dense.dtype == torch.bool
        assert torch.equal(dense, _dense_from_blocks(graph))
        assert graph.num_edges == int(dense.sum())
        assert graph.density == pytest.approx(dense.float().mean().item())
        assert torch.equal(graph.keys_per_query(), dense.sum(1))


@pytest.mark.parametrize("seq_len", [70, 200])
def test_causal_keeps_only_past(seq_len):
    for graph in _all_patterns(seq_len):
        causal = graph.causal()
        assert causal.is_causal
        assert torch.equal(causal.to_dense(), graph.to_dense().tril())
        assert torch.equal(causal.keys_per_query(), causal.to_dense().sum(1))


def test_union_and_equality():
    a = G.local(300, 16, window=3)
    b = G.longformer(300, 16, window=1, num_global=2)
    u = a | b
    assert torch.equal(u.to_dense(), a.to_dense() | b.to_dense())
    assert a | a == a
    with pytest.raises(ValueError, match="block_size"):
        a | G.local(300, 32)
    with pytest.raises(ValueError, match="is_causal"):
        a | a.causal()


def _random_patterns(seq_len, seed, causal=False):
    """Every pattern with settings drawn from ``seed`` (odd block sizes too), causal or not."""
    gen = torch.Generator().manual_seed(seed)

    def pick(*options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    block_size = pick(1, 3, 7, 16)
    nb = math.ceil(seq_len / block_size)
    window = pick(*[w for w in (1, 3, 5) if w <= 2 * nb - 1])
    kw = {"causal": causal}
    return [
        G.full(seq_len, block_size, **kw),
        G.local(seq_len, block_size, window=window, **kw),
        G.longformer(seq_len, block_size, window=window, num_global=pick(0, 1, 2), **kw),
        G.bigbird(seq_len, block_size, window=window, num_global=pick(0, 2), num_random=pick(1, 3), seed=seed, **kw),
        G.diffuser(seq_len, block_size, window=window, num_global=pick(1, 2), num_random=2, seed=seed, **kw),
        G.diffuser(seq_len, block_size, window=window, num_random=1, seed=seed, random_granularity="token", **kw),
        G.hypercube(seq_len, block_size, **kw),
        G.grid2d(seq_len, side=pick(4, 7), radius=pick(1, 2), num_random=pick(0, 2), seed=seed, **kw),
    ]


def _all_pairs(seq_len):
    q, kv = torch.meshgrid(torch.arange(seq_len), torch.arange(seq_len), indexing="ij")
    return q.reshape(-1), kv.reshape(-1)


@pytest.mark.parametrize("seq_len, seed", [(1, 0), (37, 1), (64, 2), (101, 3), (129, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_mask_mod_equals_to_dense_on_every_pair(seq_len, seed, causal):
    for graph in _random_patterns(seq_len, seed, causal):
        q, kv = _all_pairs(seq_len)
        zero = torch.zeros((), dtype=torch.int64)
        values = graph.mask_mod()(zero, zero, q, kv)
        assert values.dtype == torch.bool
        assert torch.equal(values.view(seq_len, seq_len), graph.to_dense()), graph
        # padded positions (FlexAttention rounds lengths up to its tiles) attend nowhere
        past = torch.arange(seq_len, seq_len + 5)
        assert not graph.mask_mod()(zero, zero, past, past.flip(0)).any()
        assert not graph.mask_mod()(zero, zero, past % seq_len, past).any()


@pytest.mark.parametrize("causal", [False, True])
def test_mask_mod_runs_flex_attention_like_masked_sdpa(causal):
    """create_block_mask(graph.mask_mod()) + flex_attention == dense masked SDPA (CPU, float32)."""
    import warnings

    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    seq_len, heads, head_dim = 75, 2, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, seq_len, head_dim, generator=gen) for _ in range(3))
    for graph in _random_patterns(seq_len, 5, causal):
        try:
            block_mask = fa.create_block_mask(graph.mask_mod(), None, None, seq_len, seq_len, device="cpu")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
                out = fa.flex_attention(q, k, v, block_mask=block_mask)
        except (NotImplementedError, RuntimeError) as error:  # pragma: no cover - depends on the torch build
            pytest.skip(f"FlexAttention does not run on CPU in torch {torch.__version__}: {error}")
        dense = graph.to_dense()
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5), graph


@pytest.mark.parametrize("seq_len, seed", [(1, 0), (45, 1), (130, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_intersection_is_the_and_of_the_token_masks(seq_len, seed, causal):
    patterns = _random_patterns(seq_len, seed, causal)
    by_block_size = {}
    for graph in patterns:
        by_block_size.setdefault(graph.block_size, []).append(graph)
    for group in by_block_size.values():
        for a in group:
            assert (a & a) == a
            for b in group:
                both = a & b
                assert torch.equal(both.to_dense(), a.to_dense() & b.to_dense()), (a, b)
                assert both.is_causal == causal
                assert torch.equal(both.keys_per_query(), both.to_dense().sum(1))
                assert torch.equal((a | b).to_dense(), a.to_dense() | b.to_dense())


def test_intersection_names_and_errors():
    a = G.local(300, 16, window=3)
    b = G.longformer(300, 16, window=1, num_global=2)
    c = G.bigbird(300, 16, seed=1)
    assert (a & b).name == "local(w=3) & longformer(w=1, g=2)"
    assert ((a | b) & c).name == f"(local(w=3) | longformer(w=1, g=2)) & {c.name}"
    assert torch.equal(((a | b) & c).to_dense(), (a.to_dense() | b.to_dense()) & c.to_dense())
    with pytest.raises(ValueError, match="cannot intersect graphs with different block_size: 16 and 32"):
        a & G.local(300, 32)
    with pytest.raises(ValueError, match="cannot intersect graphs with different seq_len: 300 and 301"):
        a & G.local(301, 16)
    with pytest.raises(ValueError, match="is_causal"):
        a & a.causal()
    with pytest.raises(ValueError, match="block_size"):
        a & G.grid2d(300, side=20)  # a token-level graph has block_size 1
    with pytest.raises(TypeError):
        a & a.to_dense()


def test_full_and_local_shapes():
    g = G.full(100, 16)
    assert g.density == 1.0 and g.to_dense().all()
    loc = G.local(160, 16, window=3).to_dense()
    i, j = torch.meshgrid(torch.arange(160), torch.arange(160), indexing="ij")
    assert torch.equal(loc, (i // 16 - j // 16).abs() <= 1)


def test_bigbird_random_blocks_counts_and_seed():
    g = G.bigbird(2048, 64, window=3, num_global=2, num_random=3, seed=7)
    nb = g.num_blocks
    for qb, keys in enumerate(g.block_lists()):
        if qb < 2:
            assert keys == list(range(nb))  # global rows
            continue
        fixed = {0, 1} | {b for b in (qb - 1, qb, qb + 1) if 0 <= b < nb}
        assert fixed <= set(keys)
        assert len(set(keys) - fixed) == 3  # exactly num_random extra blocks
    same = G.bigbird(2048, 64, window=3, num_global=2, num_random=3, seed=7)
    other = G.bigbird(2048, 64, window=3, num_global=2, num_random=3, seed=8)
    assert g == same and g != other


def test_bigbird_causal_random_from_past_only():
    g = G.bigbird(1024, 32, num_random=3, seed=1, causal=True)
    for qb, keys in enumerate(g.block_lists()):
        assert max(keys) <= qb


def test_diffuser_pattern_properties():
    g = G.diffuser(4096, 64, window=3, num_global=4, num_random=3, seed=0)
    dense = g.to_dense()
    idx = torch.arange(4095)
    assert dense[idx, idx + 1].all() and dense[idx + 1, idx].all(), "i<->i+1 edges (universal approximation)"
    assert dense.diagonal().all(), "self-loops"
    nb = g.num_blocks
    full_rows = [qb for qb, keys in enumerate(g.block_lists()) if len(keys) == nb]
    assert len(full_rows) == 4 and 0 not in full_rows  # scattered globals, never the first block
    # token granularity keeps the random budget per query
    t = G.diffuser(300, 16, num_global=1, num_random=2, random_granularity="token", seed=0)
    assert t.block_size == 1
    block = G.diffuser(300, 16, num_global=1, num_random=0, seed=0)
    extra = t.keys_per_query() - block.keys_per_query()
    assert (extra <= 32).all() and (extra >= 30).float().mean() > 0.9


def test_diffuser_reference_window():
    # block 32, window 3 = the reference's 64-wide blocks at stride 32: ~96 keys, 64 at the ends
    g = G.diffuser(1024, 32, window=3, num_global=0, num_random=0)
    keys = g.keys_per_query()
    assert keys[0] == 64 and keys[-1] == 64 and keys[500] == 96


def test_hypercube_matches_gray_code_construction():
    for n in (8, 16, 64):
        k = int(math.log2(n))
        labels = [0, 1]
        while len(labels) < n:
            labels = labels + labels[::-1]
            labels = [x << 1 for x in labels]
            half = len(labels) // 2
            labels = labels[:half] + [x | 1 for x in labels[half:]]
        position = {label: p for p, label in enumerate(labels)}
        g = G.hypercube(n * 16, 16)
        for p, keys in enumerate(g.block_lists()):
            expected = {p} | {position[labels[p] ^ (1 << j)] for j in range(k)}
            assert set(keys) == expected
        if n == 8:
            assert labels == [0, 4, 6, 2, 3, 7, 5, 1]
        assert g.degree_stats()["blocks_max"] == k + 1


def test_hypercube_symmetric():
    adj = G.hypercube(4096, 16).block_adjacency()
    assert torch.equal(adj, adj.T)


def test_partial_last_block_never_leaks():
    g = G.bigbird(100, 64, window=1, num_global=1, num_random=0)
    assert g.num_blocks == 2 and g.padded_len == 128
    assert g.to_dense().shape == (100, 100)
    assert g.keys_per_query().max() == 100


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: G.local(100, 0), "block_size"),
        (lambda: G.local(100, -4), "block_size"),
        (lambda: G.local(0, 16), "seq_len"),
        (lambda: G.local(100, 16, window=20), "window"),
        (lambda: G.local(100, 16, window=2), "window"),
        (lambda: G.bigbird(100, 16, num_random=-1), "num_random"),
        (lambda: G.bigbird(100, 16, num_global=-2), "num_global"),
        (lambda: G.bigbird(100, 16, seed=1.5), "seed"),
        (lambda: G.bigbird(100, 16, seed="0"), "seed"),
        (lambda: G.diffuser(100, 16, random_granularity="edge"), "random_granularity"),
        (lambda: G.build_graph("star", 100), "pattern"),
        (lambda: G.grid2d(99), "side"),
        (lambda: G.grid2d(100, 16), "block_size"),
        (lambda: G.grid2d(100, radius=0), "radius"),
        (lambda: G.grid2d(100, side=-10), "side"),
        (lambda: G.grid2d(100, num_random=-1), "num_random"),
    ],
)
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize("side, radius", [(5, 1), (7, 2), (6, 1)])
def test_grid2d_connects_exactly_the_pixel_neighbourhoods(side, radius):
    seq_len = side * side + side // 2  # a ragged extra row, as padding makes
    graph = G.grid2d(seq_len, side=side, radius=radius)
    expected = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for i in range(seq_len):
        for j in range(seq_len):
            expected[i, j] = abs(i // side - j // side) <= radius and abs(i % side - j % side) <= radius
    assert torch.equal(graph.to_dense(), expected)
    assert torch.equal(graph.to_dense(), graph.to_dense().T)  # neighbourhoods are symmetric
    assert graph.keys_per_query().max() == (2 * radius + 1) ** 2
    assert G.grid2d(side * side, radius=radius) == G.grid2d(side * side, side=side, radius=radius)


def test_grid2d_random_keys_are_seeded_and_outside_the_neighbourhood():
    plain = G.grid2d(100).to_dense()
    noisy = G.grid2d(100, num_random=3, seed=1)
    extra = noisy.to_dense() & ~plain
    assert torch.equal(noisy.to_dense() | plain, noisy.to_dense())
    assert torch.equal(extra.sum(1), torch.full((100,), 3))
    assert noisy == G.grid2d(100, num_random=3, seed=1)
    assert noisy != G.grid2d(100, num_random=3, seed=2)


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "g.png"
    G.bigbird(1024, 64).plot(str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_million_token_graph_is_cheap():
    g = G.bigbird(1 << 20, 128)
    assert g.num_blocks == 8192 and g.indices.numel() < 20 * 8192


RANDOM_CAUSAL = [
    ("bigbird", {"block_size": 32, "num_random": 3}),
    ("bigbird", {"block_size": 17, "num_global": 3, "num_random": 2}),
    ("diffuser", {"block_size": 32}),
    ("diffuser", {"block_size": 16, "global_blocks": [0, 3, 40]}),
    ("diffuser", {"block_size": 16, "random_granularity": "token", "num_random": 1}),
    ("grid2d", {"side": 31, "num_random": 4}),
    ("longformer", {"block_size": 32, "num_global": 2}),
    ("hypercube", {"block_size": 16}),
    ("local", {"block_size": 16, "window": 5}),
]


@pytest.mark.parametrize("pattern, options", RANDOM_CAUSAL)
@pytest.mark.parametrize("short, long", [(1000, 2048), (333, 961), (64, 65)])
def test_causal_graphs_are_prefix_stable(pattern, options, short, long):
    """A causal graph at ``short`` tokens is the top-left corner of the one at ``long``: a causal model's past
    does not depend on the length the sequence will reach (hypercube and local have no randomness, but a
    Gray-code or band must not move with the length either)."""
    seeded = pattern in ("bigbird", "diffuser", "grid2d")
    if seeded:
        options = {**options, "seed": short + long}
    small = G.build_graph(pattern, short, causal=True, **options)
    large = G.build_graph(pattern, long, causal=True, **options)
    assert torch.equal(small.to_dense(), large.to_dense()[:short, :short])
    if seeded and long > 900:  # (short graphs have no block left to draw at random)
        other = G.build_graph(pattern, long, causal=True, **{**options, "seed": options["seed"] + 1})
        assert not torch.equal(other.to_dense(), large.to_dense()), "the seed must matter"


def test_causal_random_blocks_differ_across_rows_and_are_uniform():
    """Prefix-stable random blocks are still random: rows draw different blocks, and over many rows each
    earlier block is drawn about equally often (chi-square against uniform over the allowed blocks)."""
    graph = G.bigbird(64 * 400, 64, window=1, num_global=0, num_random=1, seed=5, causal=True)
    lists = graph.block_lists()
    picks = [max(set(keys) - {row}) if len(keys) > 1 else None for row, keys in enumerate(lists)]
    assert len({p for p in picks[200:] if p is not None}) > 100, "rows must not repeat one another's blocks"
    # rows 100..399 each pick one block uniformly from 0..row-1: the expected count of block j
    expected = torch.zeros(400, dtype=torch.float64)
    counts = torch.zeros(400, dtype=torch.float64)
    for row in range(100, 400):
        expected[:row] += 1.0 / row
        counts[picks[row]] += 1
    chi2 = float(((counts[:399] - expected[:399]) ** 2 / expected[:399]).sum())
    assert chi2 < 399 + 5 * (2 * 399) ** 0.5, f"chi-square {chi2:.0f} for 398 degrees of freedom"


@pytest.mark.parametrize("pattern", ["bigbird", "diffuser"])
def test_bidirectional_random_blocks_differ_across_rows_and_are_uniform(pattern):
    """Bidirectional random blocks, as documented: per query block ``num_random`` distinct blocks drawn
    uniformly from those it does not attend already (here: every block but its own). Rows draw independently:
    two neighbouring rows share about ``r^2 / (n - 1)`` blocks, not all of them; and over all rows each block
    is drawn about equally often (chi-square against the expected counts)."""
    n, r = 400, 10
    graph = G.build_graph(pattern, 64 * n, 64, window=1, num_global=0, num_random=r, seed=5)
    picks = [set(keys) - {row} for row, keys in enumerate(graph.block_lists())]
    assert all(len(p) == r for p in picks), "exactly num_random blocks per row, none of them the row's own"
    overlap = sum(len(a & b) for a, b in zip(picks, picks[1:])) / (n - 1)
    assert overlap < 1.0, f"neighbouring rows share {overlap:.1f} of {r} random blocks: rows repeat one another"
    counts = torch.zeros(n, dtype=torch.float64)
    for p in picks:
        counts[list(p)] += 1
    expected = r  # each of the n - 1 other rows draws block j with probability r / (n - 1)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < (n - 1) + 5 * (2 * (n - 1)) ** 0.5, f"chi-square {chi2:.0f} for {n - 1} degrees of freedom"


def test_bigbird_global_placement():
    both = G.bigbird(1024, 64, num_global=2, num_random=0, global_placement="first_last")
    lists = both.block_lists()
    assert len(lists[0]) == len(lists[-1]) == both.num_blocks and len(lists[1]) < both.num_blocks
    assert all({0, 15} <= set(keys) for keys in lists)
    with pytest.raises(ValueError, match="prefix stability"):
        G.bigbird(1024, 64, global_placement="first_last", causal=True)
    with pytest.raises(ValueError, match="global_placement"):
        G.bigbird(1024, 64, global_placement="middle")
