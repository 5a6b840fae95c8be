"""The planted bugs of ``tools/mutation.py``: each a small, plausible mistake in the library, written as exact
text replacements (every ``old`` must occur exactly once in its file), with the tests that should catch it.

A mutant that no longer applies (the code moved on) makes ``tests/test_mutants.py`` fail: update its ``old``
text to the code as it is now, keeping the bug the same. Add a mutant for every bug the suite once missed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str  # ops, graphs, analysis, data, train
    path: str  # relative to the repository root
    bug: str  # the mistake, in words
    edits: tuple[tuple[str, str], ...]  # (old, new) exact replacements, each old text unique in the file
    tests: tuple[str, ...]  # pytest arguments: the tests that should catch it


def m(name, area, path, bug, edits, *tests):
    return Mutant(name, area, path, bug, tuple(edits), tuple(tests))


MUTANTS = [
    # ---------------------------------------------------------------------------------------------- graphs
    m(
        "bigbird-random-same-for-every-row", "graphs", "hopformer/graphs/patterns.py",
        "bidirectional random blocks drawn from one score row shared by every query block",
        [("taken, torch.rand(stop - start, num_blocks, generator=generator)",
          "taken, torch.rand(1, num_blocks, generator=generator).repeat(stop - start, 1)")],
        "tests/test_graphs.py",
    ),
    m(
        "hypercube-plain-bit-flips", "graphs", "hopformer/graphs/patterns.py",
        "hypercube neighbours by flipping bit j (p ^ 2^j) instead of the Gray-code mirror p ^ (2^(j+1) - 1)",
        [("masks = torch.tensor([(1 << (j + 1)) - 1 for j in range(k)]",
          "masks = torch.tensor([1 << j for j in range(k)]")],
        "tests/test_graphs.py",
    ),
    m(
        "global-blocks-do-not-attend", "graphs", "hopformer/graphs/patterns.py",
        "global blocks are attended by every block but no longer attend to every block themselves",
        [("    out[inside - start] = True  # and the global blocks attend to everyone",
          "    out[inside - start] |= False  # and the global blocks attend to everyone")],
        "tests/test_graphs.py",
    ),
    m(
        "local-band-one-block-short", "graphs", "hopformer/graphs/patterns.py",
        "the sliding band stops one block short of its radius",
        [("return (torch.arange(num_blocks)[None, :] - rows).abs() <= radius",
          "return (torch.arange(num_blocks)[None, :] - rows).abs() < max(radius, 1)")],
        "tests/test_graphs.py",
    ),
    # ------------------------------------------------------------------------------------------------- ops
    m(
        "heat-kernel-k-plus-one-factorial", "ops", "hopformer/ops/coefficients.py",
        "heat-kernel coefficients e^-t t^k / (k+1)! instead of / k!",
        [("math.lgamma(k + 1)) for k in range(hops + 1)]", "math.lgamma(k + 2)) for k in range(hops + 1)]")],
        "tests/test_ops.py",
    ),
    m(
        "ppr-tail-one-power-too-many", "ops", "hopformer/ops/coefficients.py",
        "the kept PPR tail weighs A^hops by (1 - alpha)^(hops + 1) (then renormalised)",
        [("weights[hops] = (1 - alpha) ** hops", "weights[hops] = (1 - alpha) ** (hops + 1)")],
        "tests/test_ops.py",
    ),
    m(
        "routing-keys-ranked-raw-under-l2", "ops", "hopformer/ops/routing_attention.py",
        "with qk_norm='l2' routing ranks the raw keys (no normalisation) to pick cluster members",
        [("key_idx = rank(normalise(k.to(dtype), qk_norm), centroids",
          "key_idx = rank(k.to(dtype) if qk_norm == 'l2' else normalise(k.to(dtype), qk_norm), centroids")],
        "tests/test_routing.py",
    ),
    m(
        "routing-queries-ranked-raw", "ops", "hopformer/ops/routing_attention.py",
        "routing ranks the raw queries (no normalisation) to pick cluster members",
        [("query_idx = rank(normalise(q.to(dtype), qk_norm), centroids",
          "query_idx = rank(q.to(dtype), centroids")],
        "tests/test_routing.py",
    ),
    m(
        "per-hop-edge-dropout-reuses-one-mask", "ops", "hopformer/ops/gather.py",
        "gather's edge_dropout='per_hop' silently reuses the first hop's mask at every hop",
        [("            draw = t if run.per_hop else 0", "            draw = 0")],
        "tests/test_ops.py",
    ),
    m(
        "dense-reference-per-hop-reuses-one-mask", "ops", "hopformer/ops/reference.py",
        "the dense reference's edge_dropout='per_hop' draws one mask for every hop",
        [("once = operator.dropped(p) if p > 0 and not per_hop else operator",
          "once = operator.dropped(p) if p > 0 else operator"),
         ("return operator.dropped(p).apply(z) if p > 0 and per_hop else once.apply(z)", "return once.apply(z)")],
        "tests/test_ops.py",
    ),
    m(
        "gather-backward-hop-dropout-residual", "ops", "hopformer/ops/gather.py",
        "gather's backward forgets the (1 - hop_p) factor of the softmax residual under hop dropout",
        [("r = dot.mul_(1 - run.hop_p) if r is None else r.add_(dot, alpha=1 - run.hop_p)",
          "r = dot if r is None else r.add_(dot)")],
        "tests/test_ops.py",
    ),
    m(
        "gather-backward-per-hop-first-mask", "ops", "hopformer/ops/gather.py",
        "gather's score gradient applies the first hop's edge mask to every hop under per_hop dropout",
        [("term.mul_(keep_of(t))", "term.mul_(keep_of(used[0]))")],
        "tests/test_ops.py",
    ),
    m(
        "matrix-backward-hop-dropout-unscaled", "ops", "hopformer/ops/matrix.py",
        "the matrix backend's backward drops the 1 / (1 - p) rescaling of hop dropout",
        [("u = u * ctx.keeps[t] / (1 - hop_p)", "u = u * ctx.keeps[t]")],
        "tests/test_ops.py",
    ),
    m(
        "masked-softmax-empty-rows-uniform", "ops", "hopformer/ops/common.py",
        "a row with no allowed key gets the uniform softmax instead of zeros",
        [('return probs.masked_fill(masked, 0.0) if empty_rows == "zero" else probs', "return probs")],
        "tests/test_ops.py", "tests/test_masked_sdpa.py",
    ),
    m(
        "triton-backward-step-off-by-one", "ops", "hopformer/ops/triton_diffusion.py",
        "the Triton backward applies the mixing weight of the following hop (a=steps[t] for steps[t - 1])",
        [("transposed=True, a=steps[t - 1], keep=keep(t - 1)", "transposed=True, a=steps[t], keep=keep(t - 1)")],
        "tests/test_triton_backend.py",
    ),
    m(
        "flex-padded-key-tiles-full", "ops", "hopformer/ops/flex.py",
        "the flex plan caps tile codes by padding on the query side only: key tiles with padding stay full",
        [("codes = torch.minimum(torch.minimum(codes, tile_real[:, None, :]), tile_real[:, :, None])",
          "codes = torch.minimum(codes, tile_real[:, :, None])")],
        "tests/test_flex_cpu.py",
    ),
    m(
        "flex-mask-mod-attends-padded-keys", "ops", "hopformer/ops/flex.py",
        "the flex mask_mod forgets the key side of the padding mask",
        [("allowed = allowed & real[b, kv_idx] & real[b, q_idx]", "allowed = allowed & real[b, q_idx]")],
        "tests/test_flex_cpu.py",
    ),
    m(
        "combiner-flex-causal-own-summary", "ops", "hopformer/ops/combiner_flex.py",
        "causal Combiner-Fixed on flex also reads its own block's summary (which holds later tokens)",
        [("summary = summary & ((region < own) if causal else (region != own))",
          "summary = summary & ((region <= own) if causal else (region != own))")],
        "tests/test_flex_cpu.py", "tests/test_combiner.py",
    ),
    m(
        "combiner-flex-tiles-full-across-blocks", "ops", "hopformer/ops/combiner_flex.py",
        "Combiner-Fixed's flex tiles are marked full for blocks of 64 tokens, whose 128-token tiles span two blocks",
        [("if full and block >= 128:", "if full and block >= 64:")],
        "tests/test_flex_cpu.py", "tests/test_combiner.py",
    ),
    m(
        "routing-local-heads-flex-window-5", "ops", "hopformer/attention/routing.py",
        "Routing's local heads on flex attend a band of 5 blocks instead of 3",
        [("return graphs.local(seq, block, window=min(3, 2 * blocks - 1), causal=causal)",
          "return graphs.local(seq, block, window=min(5, 2 * blocks - 1), causal=causal)")],
        "tests/test_flex_cpu.py", "tests/test_routing.py",
    ),
    # -------------------------------------------------------------------------------------------- analysis
    m(
        "nip-hub-share-over-n", "analysis", "hopformer/analysis/nip.py",
        "the hub correction divides a relayed path's payload by N instead of N - 1",
        [("math.log(total - 1), 0.0)", "math.log(total), 0.0)")],
        "tests/test_analysis_nip.py",
    ),
    m(
        "heat-spectral-map-shifted", "analysis", "hopformer/analysis/spectral.py",
        "the exact heat-kernel spectral map exp(t mu - 1) instead of exp(t (mu - 1))",
        [("return np.exp(heat_time * (mu - 1))", "return np.exp(heat_time * mu - 1)")],
        "tests/test_analysis_spectral.py",
    ),
    m(
        "spectral-gap-without-modulus", "analysis", "hopformer/analysis/spectral.py",
        "the spectral gap takes 1 - Re(lambda_2) instead of 1 - |lambda_2|",
        [("gap = min(1.0, max(0.0, float(1.0 - abs(used[1]))))",
          "gap = min(1.0, max(0.0, float(1.0 - used[1].real)))")],
        "tests/test_analysis_spectral.py",
    ),
    # ------------------------------------------------------------------------------------------------ data
    m(
        "listops-median-upper-middle", "data", "hopformer/data/listops.py",
        "[MED of an even number of arguments takes the upper middle value, not the truncated mean of the two",
        [("return (ordered[middle - 1] + ordered[middle]) // 2", "return ordered[middle]")],
        "tests/test_listops.py",
    ),
    m(
        "cifar-grayscale-scale-255", "data", "hopformer/data/lra.py",
        "the CIFAR-10 grayscale scales back by 255 instead of TensorFlow's 255.5",
        [("return (gray * np.float32(255.5)).astype(np.uint8)", "return (gray * np.float32(255.0)).astype(np.uint8)")],
        "tests/test_lra_loaders.py",
    ),
    m(
        "pathfinder-label-from-wrong-column", "data", "hopformer/data/lra.py",
        "Pathfinder labels read from the metadata's fifth column instead of the fourth",
        [("labels.append(int(columns[3]))", "labels.append(int(columns[4]) % 2)")],
        "tests/test_lra_loaders.py", "tests/test_pathfinder.py",
    ),
    m(
        "collate-ignores-example-masks", "data", "hopformer/data/batching.py",
        "collate marks every token of an example real, ignoring the example's own attention mask",
        [("padded_mask[row, : len(mask)] = mask", "padded_mask[row, : len(mask)] = True")],
        "tests/test_batching.py",
    ),
    # ----------------------------------------------------------------------------------------------- train
    m(
        "checkpoint-deletes-old-before-new", "train", "hopformer/train/checkpoint.py",
        "save_checkpoint deletes the old checkpoint before the new one is in place",
        [("            shutil.rmtree(retired, ignore_errors=True)\n            os.replace(directory, retired)",
          "            shutil.rmtree(directory)")],
        "tests/test_checkpoint_crash.py", "tests/test_trainer.py",
    ),
    m(
        "checkpoint-resumes-retired-copy", "train", "hopformer/train/checkpoint.py",
        "find_checkpoint prefers the retired copy over a complete checkpoint in place",
        [("    if (directory / STATE_NAME).is_file():\n        return directory\n"
          "    if (retired / STATE_NAME).is_file():\n        return retired\n",
          "    if (retired / STATE_NAME).is_file():\n        return retired\n"
          "    if (directory / STATE_NAME).is_file():\n        return directory\n")],
        "tests/test_checkpoint_crash.py", "tests/test_trainer.py",
    ),
    m(
        "checkpoint-reuses-stale-staging", "train", "hopformer/train/checkpoint.py",
        "save_checkpoint writes into a staging folder left by a crash without clearing it first",
        [("    shutil.rmtree(staging, ignore_errors=True)\n    try:", "    try:")],
        "tests/test_checkpoint_crash.py", "tests/test_trainer.py",
    ),
    m(
        "resume-skips-numpy-rng", "train", "hopformer/train/checkpoint.py",
        "resuming restores the Python and torch generators but not numpy's",
        [("    np.random.set_state(\n", "    (\n")],
        "tests/test_trainer.py", "tests/test_checkpoint_crash.py",
    ),
    m(
        "warmup-starts-at-zero", "train", "hopformer/train/optim.py",
        "linear warmup gives the first step a learning rate of 0 (step / warmup)",
        [("return peak * (step + 1) / warmup", "return peak * step / warmup")],
        "tests/test_trainer.py",
    ),
    m(
        "data-order-resumes-one-batch-early", "train", "hopformer/train/batches.py",
        "a resumed data stream replays the last batch before the checkpoint",
        [('self.epoch, self.position = int(state["epoch"]), int(state["position"])',
          'self.epoch, self.position = int(state["epoch"]), max(0, int(state["position"]) - 1)')],
        "tests/test_trainer.py",
    ),
]  # fmt: skip
