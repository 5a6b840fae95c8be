"""A causal language model: a causal :class:`~hopformer.models.TransformerEncoder` (every attention built with
``causal=True``) and a linear head over the vocabulary, its weights tied to the token embedding or not.

``forward(input_ids, attention_mask=None) -> logits (batch, seq, vocab)``: the logits at position ``t``
predict token ``t + 1`` from tokens ``0..t``. :meth:`CausalLM.generate` continues prompts, with incremental
decoding caches (:mod:`hopformer.attention.decoding`) or by recomputing the full pass; on CUDA the cached step
is replayed from a CUDA graph where every layer's cache allows it (:class:`CUDAGraphStep`). Bytes are tokens
``0..255`` (``vocab_size=256``, no padding id: byte 0 is real text), so a byte LM needs no tokenizer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from hopformer.attention.decoding import graph_safe
from hopformer.checks import check_finite, check_int
from hopformer.models.encoder import EncoderConfig, TransformerEncoder
from hopformer.models.pretrained import PretrainedModel


@dataclass
class CausalLMConfig:
    """Hyperparameters of :class:`CausalLM`: its encoder (made causal) and whether the output layer shares
    the token embedding's weights (``tie_embeddings``, as GPT-2 does)."""

    encoder: EncoderConfig
    tie_embeddings: bool = True


class CausalLM(PretrainedModel):
    """Next-token prediction on any registered attention (see the module docstring)."""

    config_class = CausalLMConfig
    model_type = "causal_lm"

    def __init__(self, config: CausalLMConfig) -> None:
        super().__init__()
        if not isinstance(config, CausalLMConfig):
            raise TypeError(f"CausalLM takes a CausalLMConfig, got {type(config).__name__}")
        if config.encoder.embedding != "table":
            raise ValueError(
                f"a causal LM reads tokens through an embedding table; embedding={config.encoder.embedding!r} "
                "reads pixel intensities, which a next-token head cannot tie to"
            )
        config = replace(config, encoder=replace(config.encoder, causal=True))
        self.config = config
        self.encoder = TransformerEncoder(config.encoder)
        self.head = nn.Linear(config.encoder.dim, config.encoder.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.encoder.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=0.02)

    @classmethod
    def from_config(cls, config: CausalLMConfig) -> CausalLM:
        return cls(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask))

    # ------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[torch.Tensor],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        seed: int | None = None,
        stop_token: int | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
        cuda_graph: bool | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Continue each prompt by up to ``max_new_tokens`` tokens.

        Args:
            input_ids: ``(batch, prompt)`` ids, or a list of 1-D prompts of different lengths (decoded together,
                each at its own positions).
            temperature: 0 picks the most likely token (greedy); above 0 samples from the softmax of
                ``logits / temperature``, restricted by ``top_k`` (the k most likely) and ``top_p`` (the
                smallest set of tokens whose probability reaches p).
            use_cache: decode incrementally, each layer keeping only what a new token can reach
                (:mod:`hopformer.attention.decoding`); ``False`` runs the full forward pass again at every step.
                Both give the same tokens (the same logits, to rounding).
            seed: seeds the sampling (``None``: the global generator).
            stop_token: a sequence that emits it stops there (the rest of its row repeats it); all stopped
                ends the loop.
            on_token: called with each step's new tokens ``(batch,)`` (e.g. to print them as they come).
            cuda_graph: replay every cached decoding step from one CUDA graph (the new tokens' embedding, every
                layer's step, the final norm and the head; sampling stays outside), which removes the step's
                kernel-launch overhead. ``None`` (default): wherever possible, i.e. with ``use_cache`` on a CUDA
                device and every layer's cache graph-safe (full attention and the graph attentions: local,
                Longformer, BigBird, hypercube, grid, Diffuser; Routing and Combiner decode eagerly). ``True``:
                the same, but a ``ValueError`` saying why where impossible. ``False``: eager steps. Same tokens
                either way.

        Returns:
            ``(batch, prompt + new)`` ids for a tensor input; a list of 1-D tensors for a list of prompts.
        """
        prompts = _prompt_list(input_ids)
        check_int("max_new_tokens", max_new_tokens, 0)
        check_sampling(temperature, top_k, top_p)
        device = self.head.weight.device
        if cuda_graph not in (None, True, False):
            raise TypeError(f"cuda_graph must be None (where possible), True or False, got {cuda_graph!r}")
        if cuda_graph and not use_cache:
            raise ValueError("cuda_graph=True needs use_cache=True (recomputing changes the shapes every step)")
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {device}")
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        total = int(lengths.max()) + max_new_tokens
        if total > self.config.encoder.max_len:
            raise ValueError(
                f"prompt ({int(lengths.max())}) + max_new_tokens ({max_new_tokens}) = {total} tokens is longer than "
                f"the model's max_len={self.config.encoder.max_len}"
            )
        tokens = torch.zeros(len(prompts), total, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = prompt.to(device)
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            new = self._decode(tokens, lengths, max_new_tokens, temperature, top_k, top_p, use_cache, generator,
                               stop_token, on_token, cuda_graph)  # fmt: skip
        finally:
            self.train(was_training)
        if isinstance(input_ids, torch.Tensor):
            return tokens[:, : int(lengths.max()) + new]
        return [tokens[row, : int(lengths[row]) + new] for row in range(len(prompts))]

    def _decode(
        self, tokens, lengths, steps, temperature, top_k, top_p, use_cache, generator, stop, on_token, cuda_graph=None
    ) -> int:
        """Fill ``tokens`` after each prompt; returns how many tokens every row got."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        prompt = int(lengths.max())
        mask = torch.arange(prompt, device=tokens.device)[None, :] < lengths[:, None]
        if use_cache:
            caches = self.encoder.new_caches(tokens.shape[0], tokens.shape[1], tokens.device, self.head.weight.dtype)
            decode_step = self.step_function(caches, cuda_graph=cuda_graph)
            hidden = self.encoder(tokens[:, :prompt], mask, caches=caches)
            logits = self.head(hidden[rows, lengths - 1])
        else:
            logits = self._last_logits(tokens, lengths)
        positions, finished = lengths.clone(), torch.zeros_like(lengths, dtype=torch.bool)
        for step in range(steps):
            chosen = sample_next(logits, temperature, top_k, top_p, generator)
            if stop is not None:
                chosen = torch.where(finished, torch.full_like(chosen, stop), chosen)
                finished |= chosen == stop
            tokens[rows, positions] = chosen
            if on_token is not None:
                on_token(chosen)
            if step + 1 == steps or (stop is not None and bool(finished.all())):
                return step + 1
            if use_cache:
                logits = decode_step(chosen, positions)
            else:
                logits = self._last_logits(tokens, positions + 1)
            positions = positions + 1
        return steps

    def step_function(
        self, caches: list[Any], *, cuda_graph: bool | None = None
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """One cached decoding step as a function ``(ids (batch,), positions (batch,)) -> logits (batch, vocab)``:
        the new token of each sequence at its position, against ``caches`` (from ``encoder.new_caches``, filled
        by a forward pass with them), which take it in; the model in eval mode. ``cuda_graph`` as in
        :meth:`generate`: with it the function is a :class:`CUDAGraphStep`, whose returned logits are overwritten
        by its next call."""
        return decoding_step(self.encoder, self.head, caches, cuda_graph=cuda_graph)

    def cuda_graph_obstacle(self, caches: list[Any]) -> str | None:
        """Why a decoding step against ``caches`` cannot be captured in a CUDA graph, or None when it can."""
        return cuda_graph_obstacle(self.encoder, self.head, caches)

    def _last_logits(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The full forward pass over each sequence's first ``lengths`` tokens; the logits at its last one."""
        width = int(lengths.max())
        mask = torch.arange(width, device=tokens.device)[None, :] < lengths[:, None]
        logits = self(tokens[:, :width], mask)
        return logits[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]


class CUDAGraphStep:
    """A graph-safe decoding step (:func:`~hopformer.attention.decoding.graph_safe` caches) replayed from a CUDA
    graph: called like the eager step ``step(ids (batch,), positions (batch,)) -> logits (batch, vocab)``.

    The first call runs the step eagerly on a side stream, twice (the warm-up PyTorch asks for before a capture;
    a graph-safe step is idempotent, so this is also that step's real work and its result), then captures it
    with static ``ids`` and ``positions`` buffers; later calls copy their inputs into those buffers and replay.
    The caches are preallocated before, so the graph writes into them in place; what the step allocates lives in
    the graph's private pool. The logits a replay returns are a static buffer that the next call overwrites. The
    batch size and the caches are fixed at capture: each :meth:`CausalLM.generate` captures its own.

    Args:
        step: the eager step (see :meth:`CausalLM.step_function`).
        device: its CUDA device.
        fall_back: if the capture fails, warn and go on eagerly instead of raising.
    """

    warmups = 2

    def __init__(
        self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device, fall_back: bool = False
    ) -> None:
        self.step, self.device, self.fall_back = step, torch.device(device), fall_back
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False
        self.ids = self.positions = self.logits = None

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.eager:
            return self.step(ids, positions)
        if self.graph is None:
            return self._capture(ids, positions)
        if ids.shape != self.ids.shape or positions.shape != self.positions.shape:  # copy_ would broadcast
            raise ValueError(
                f"this CUDA graph was captured for ids and positions of shape {tuple(self.ids.shape)}, got "
                f"{tuple(ids.shape)} and {tuple(positions.shape)}: make a new step function for another batch"
            )
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits

    def _capture(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(self.device):
            self.ids, self.positions = ids.clone(), positions.clone()
            main, side = torch.cuda.current_stream(), torch.cuda.Stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for _ in range(self.warmups):
                    logits = self.step(self.ids, self.positions)
            main.wait_stream(side)
            logits.record_stream(main)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.logits = self.step(self.ids, self.positions)
            except RuntimeError as error:
                if not self.fall_back:
                    raise
                warnings.warn(f"decoding without a CUDA graph: capturing the step failed ({error})", stacklevel=3)
                self.eager, self.logits = True, None
                return logits
            self.graph = graph
        return logits


def _prompt_list(input_ids: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.is_floating_point():
            raise ValueError(
                f"input_ids must be a (batch, prompt) tensor of ids with prompt >= 1, got {input_ids.shape}"
            )
        return list(input_ids)
    prompts = [torch.as_tensor(p, dtype=torch.long) for p in input_ids]
    if not prompts or any(p.dim() != 1 or len(p) == 0 for p in prompts):
        raise ValueError("input_ids must be a (batch, prompt) tensor or a non-empty list of non-empty 1-D prompts")
    return prompts


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Sampling settings: ``temperature`` finite and >= 0, ``top_k`` a positive integer, ``top_p`` in (0, 1]."""
    check_finite("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None:
        check_int("top_k", top_k, 1)
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def decoding_step(
    encoder: nn.Module, head: nn.Module, caches: list[Any], *, cuda_graph: bool | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """:meth:`CausalLM.step_function` of any causal ``encoder`` and output ``head`` (``hopformer.hf``'s causal LM
    holds the same two modules)."""

    def eager(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return head(encoder.step(ids[:, None], positions, caches))[:, 0]

    if cuda_graph is False:
        return eager
    obstacle = cuda_graph_obstacle(encoder, head, caches)
    if obstacle is None:
        return CUDAGraphStep(eager, head.weight.device, fall_back=cuda_graph is None)
    if cuda_graph:
        raise ValueError(f"cuda_graph=True is not possible here: {obstacle}; pass cuda_graph=None or False")
    return eager


def cuda_graph_obstacle(encoder: nn.Module, head: nn.Module, caches: list[Any]) -> str | None:
    """Why a decoding step of ``encoder`` and ``head`` against ``caches`` cannot be captured in a CUDA graph, or
    None when it can."""
    reasons = []
    device = head.weight.device
    if device.type != "cuda":
        reasons.append(f"CUDA graphs need the model on a CUDA device; it is on {device}")
    unsafe = [f"layer {index} ({type(cache).__name__})" for index, cache in enumerate(caches) if not graph_safe(cache)]
    if unsafe:
        reasons.append(
            f"the {encoder.config.attention} attention's decoding caches ({', '.join(unsafe)}) step with host "
            "synchronisation (Routing and Combiner read counters and completed blocks on the host): they decode "
            "eagerly"
        )
    return "; ".join(reasons) or None


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row of ``logits (batch, vocab)``: the argmax at temperature 0, else a sample of
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely and to the smallest set whose
    probability reaches ``top_p``."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass of the tokens ranked above
        ordered = ordered.masked_fill(before >= top_p, float("-inf"))  # the first token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
