"""Sampling from mamba-ssm's MambaLMHeadModel with its own recurrent inference machinery.

The model is never reimplemented: prompts are prefilled by ``model(ids, inference_params=...)``,
which leaves each layer's recurrent state (conv and SSM state; K/V cache for attention layers) in
``InferenceParams.key_value_memory_dict``, and every new token is one ``seqlen_offset > 0`` step of
the same model. On CUDA the steps replay mamba-ssm's CUDA graphs (``update_graph_cache``); on CPU
the same steps run eagerly on the reference kernels installed by ``kotomamba.kernels``.

Prompts of different lengths in one batch: left padding would feed pad tokens through the
recurrence (there is no attention mask to hide them), so instead each prompt is prefilled on its
own (prompts of equal length together) and its per-layer states are copied into its row of the
batch's decoding cache. The decode steps then run the whole batch at once. Mamba layers have no
notion of position, so rows at different positions decode correctly side by side. Attention layers
of hybrid models do need one position per step (mamba-ssm's CUDA-graph runner sets one length for
all rows), so for hybrids a batch only holds prompts of equal length. (On GPU, mamba-ssm's attention
decode step is only right with flash-attn installed: its fallback without it aligns the causal mask
of a one-token query to the first cached key.)

Sampling is reproducible per sequence: sequence (prompt p, sample s) draws its random numbers
from its own generator seeded with (seed, p, s), so its tokens do not depend on the batch size or
on which other prompts it is decoded with.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from kotomamba.kernels import ensure_kernel_backend
from kotomamba.errors import KotomambaError

if TYPE_CHECKING:
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.utils.generation import InferenceParams


class GenerationError(KotomambaError, ValueError):
    """Sampling settings or prompts are invalid; the message names the flag or prompt."""


@dataclass(frozen=True)
class SamplingSettings:
    """How each next token is chosen. Filters apply in this order (as in Hugging Face's generate):
    repetition penalty, temperature, top-k, top-p, min-p. ``greedy`` takes the argmax after the
    repetition penalty and ignores the other settings."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    greedy: bool = False

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
            (math.isfinite(self.temperature) and self.temperature > 0,
             "--temperature must be > 0 (use --greedy for argmax decoding)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "--top-k must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1] (1 turns it off)"),
            (0 <= self.min_p <= 1, "--min-p must be in [0, 1] (0 turns it off)"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             "--repetition-penalty must be > 0 (1 turns it off)"),
        ]
        values = [self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty]
        for (ok, message), value in zip(checks, values):
            if not ok:
                raise GenerationError(f"{message}, got {value!r}")


@dataclass
class Completion:
    """One generated sequence. ``tokens`` excludes the stop token; ``stop_reason`` is "eos" or
    "length". The seconds are those of the batch the sequence was decoded in."""

    prompt_index: int
    sample_index: int
    tokens: list[int]
    stop_reason: str
    prefill_seconds: float
    decode_seconds: float


@dataclass
class GenerationStats:
    """Wall-clock totals of one ``Decoder.generate`` call (CUDA synchronized)."""

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    generated_tokens: int = 0  # tokens kept in completions, stop tokens included
    decode_tokens: int = 0  # of those, the ones that came out of a decode step (not the prefill)
    batches: int = 0

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# Logit processing and sampling


def filter_logits(logits: torch.Tensor, settings: SamplingSettings, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 scores of shape (batch, vocab) with every token the settings exclude set to -inf.

    ``seen`` (bool, same shape) marks the tokens already in each sequence (prompt included), which
    the repetition penalty pushes down: positive scores are divided by it, negative ones multiplied
    (the CTRL paper's rule, as in Hugging Face). top-p keeps the smallest set of most likely tokens
    whose probability reaches top_p; min-p keeps tokens at least min_p times as likely as the most
    likely one. The most likely token always survives.
    """
    scores = logits.float()
    penalty = settings.repetition_penalty
    if seen is not None and penalty != 1.0:
        scores = torch.where(seen, torch.where(scores > 0, scores / penalty, scores * penalty), scores)
    if settings.greedy:
        return scores
    if settings.temperature != 1.0:
        scores = scores / settings.temperature
    vocab = scores.shape[-1]
    if 0 < settings.top_k < vocab:
        kth_best = scores.topk(settings.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if settings.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(dim=-1)
        # A token is dropped once the more likely tokens before it already reach top_p.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= settings.top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    if settings.min_p > 0.0:
        probs = scores.softmax(dim=-1)
        scores = scores.masked_fill(probs < settings.min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return scores


def sample_tokens(scores: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
    """One token per row: the argmax when ``uniforms`` is None, else a draw from softmax(scores).

    The draw inverts the cumulative distribution at the row's uniform number in [0, 1), so a row's
    token depends only on its own scores and number (not on the batch around it).
    """
    if uniforms is None:
        return scores.argmax(dim=-1)
    probs = scores.double().softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    targets = uniforms.to(cdf).unsqueeze(-1) * cdf[..., -1:]
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    # Rounding can put a target at the very end of the CDF: fall back to the last token with mass.
    last_possible = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(tokens, last_possible)


def sequence_uniforms(seed: int, prompt_index: int, sample_index: int, count: int) -> np.ndarray:
    """The uniform numbers sequence (prompt_index, sample_index) samples with under ``seed``."""
    return np.random.default_rng([seed, prompt_index, sample_index]).random(count)


# ----------------------------------------------------------------------------------------------
# Recurrent decoding


@dataclass
class _Row:
    prompt_index: int
    sample_index: int
    tokens: list[int] = field(default_factory=list)
    stop_reason: str | None = None


class Decoder:
    """Generates from a MambaLMHeadModel with mamba-ssm's inference cache and (on CUDA) CUDA graphs.

    ``vocab_size`` is the tokenizer's: logits of the embedding's padding rows are never sampled.
    The CUDA-graph caches are kept between ``generate`` calls (one per batch size), so repeated
    calls with the same batch size do not capture again.
    """

    def __init__(self, model: MambaLMHeadModel, vocab_size: int | None = None,
                 eos_token_ids: Collection[int] = (), cuda_graph: bool = True) -> None:
        ensure_kernel_backend()
        self.model = model
        rows = model.backbone.embedding.num_embeddings
        self.vocab_size = rows if vocab_size is None else vocab_size
        if not 0 < self.vocab_size <= rows:
            raise GenerationError(f"vocab_size {vocab_size} must be in [1, {rows}] (the model's embedding rows)")
        self.eos_token_ids = frozenset(int(token) for token in eos_token_ids)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.has_attention = bool(model.config.attn_layer_idx)
        self._graph_caches: dict[int, object] = {}

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], settings: SamplingSettings, batch_size: int = 1,
                 num_samples: int = 1, seed: int = 0,
                 on_token: Callable[[int, int], None] | None = None) -> tuple[list[Completion], GenerationStats]:
        """``num_samples`` completions of every prompt (token ids), decoded ``batch_size`` sequences at a time.

        Completions come back prompt by prompt, samples in order. ``on_token(i, token)`` is called
        for each new token of completion ``i`` (its index in that list) as soon as it is sampled.
        """
        for name, value, least in (("--batch-size", batch_size, 1), ("--num-samples", num_samples, 1), ("--seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = "a positive" if least else "a non-negative"
                raise GenerationError(f"{name} must be {kind} integer, got {value!r}")
        self._check_prompts(prompts)
        rows = [_Row(p, s) for p in range(len(prompts)) for s in range(num_samples)]
        max_seqlen = max(len(prompt) for prompt in prompts) + settings.max_new_tokens
        stats = GenerationStats()
        completions: list[Completion] = []
        for batch in self._batches(rows, prompts, batch_size):
            prefill_seconds, decode_seconds = self._generate_batch(batch, prompts, settings, seed, num_samples,
                                                                   max_seqlen, on_token, stats)
            completions += [Completion(row.prompt_index, row.sample_index, row.tokens, row.stop_reason,
                                       prefill_seconds, decode_seconds) for row in batch]
        completions.sort(key=lambda c: (c.prompt_index, c.sample_index))
        return completions, stats

    def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        if not prompts:
            raise GenerationError("no prompts to generate from")
        rows = self.model.backbone.embedding.num_embeddings
        for index, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise GenerationError(f"prompt {index} has no tokens")
            bad = [token for token in prompt if not 0 <= token < rows]
            if bad:
                raise GenerationError(f"prompt {index} has token id(s) {bad[:5]} outside the model's [0, {rows})")

    def _batches(self, rows: list[_Row], prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[_Row]]:
        if self.has_attention:  # equal lengths per batch: attention steps need one position per batch
            groups: dict[int, list[_Row]] = {}
            for row in rows:
                groups.setdefault(len(prompts[row.prompt_index]), []).append(row)
            return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]

    def _generate_batch(self, batch: list[_Row], prompts: Sequence[Sequence[int]], settings: SamplingSettings,
                        seed: int, num_samples: int, max_seqlen: int,
                        on_token: Callable[[int, int], None] | None, stats: GenerationStats) -> tuple[float, float]:
        size = len(batch)
        params, step = self._decoding_cache(size, max_seqlen)  # CUDA-graph capture is not timed
        start = time.perf_counter()
        logits = self._prefill(batch, prompts, params)
        self._synchronize()
        prefill_seconds = time.perf_counter() - start

        start = time.perf_counter()
        seen = None
        all_rows = torch.arange(size, device=self.device)
        if settings.repetition_penalty != 1.0:
            seen = torch.zeros(size, self.vocab_size, dtype=torch.bool, device=self.device)
            for i, row in enumerate(batch):
                seen[i, [t for t in prompts[row.prompt_index] if t < self.vocab_size]] = True
        uniforms = None
        if not settings.greedy:
            uniforms = torch.from_numpy(np.stack([
                sequence_uniforms(seed, row.prompt_index, row.sample_index, settings.max_new_tokens) for row in batch
            ])).to(self.device)
        position = max(len(prompts[row.prompt_index]) for row in batch)
        for t in range(settings.max_new_tokens):
            tokens = sample_tokens(filter_logits(logits, settings, seen), None if uniforms is None else uniforms[:, t])
            if seen is not None:
                seen[all_rows, tokens] = True
            for row, token in zip(batch, tokens.tolist()):  # .tolist() waits for the step
                if row.stop_reason is not None:
                    continue
                stats.generated_tokens += 1
                stats.decode_tokens += int(t > 0)
                if token in self.eos_token_ids:
                    row.stop_reason = "eos"
                    continue
                row.tokens.append(token)
                if on_token is not None:
                    on_token(row.prompt_index * num_samples + row.sample_index, token)
            if all(row.stop_reason is not None for row in batch) or t == settings.max_new_tokens - 1:
                break
            logits = step(tokens, position + t)
        for row in batch:
            if row.stop_reason is None:
                row.stop_reason = "length"
        decode_seconds = time.perf_counter() - start
        stats.prefill_seconds += prefill_seconds
        stats.decode_seconds += decode_seconds
        stats.batches += 1
        return prefill_seconds, decode_seconds

    def _decoding_cache(self, size: int, max_seqlen: int
                        ) -> tuple[InferenceParams, Callable[[torch.Tensor, int], torch.Tensor]]:
        """The batch's InferenceParams and a function (tokens, seqlen_offset) -> next logits."""
        from mamba_ssm.utils.generation import InferenceParams, update_graph_cache

        if self.cuda_graph:
            # Captured once per batch size (mamba-ssm's Mamba layers step on their whole state
            # tensors, so one graph cannot serve a smaller batch); recaptured if max_seqlen grows.
            cache = update_graph_cache(self.model, self._graph_caches.get(size), size, 1, max_seqlen)
            self._graph_caches[size] = cache
            params = cache.inference_params  # its max_seqlen may exceed ours: a cache of an earlier call

            # MambaLMHeadModel ignores position_ids; the graph runner only needs a tensor to copy.
            positions = torch.zeros(size, 1, dtype=torch.long, device=self.device)

            def step(tokens: torch.Tensor, seqlen_offset: int) -> torch.Tensor:
                return cache.run(tokens.unsqueeze(1), positions, seqlen_offset)[:, -1, :self.vocab_size]

            return params, step
        params = InferenceParams(max_seqlen=max_seqlen, max_batch_size=size,
                                 key_value_memory_dict=self.model.allocate_inference_cache(size, max_seqlen, self.dtype))

        def step(tokens: torch.Tensor, seqlen_offset: int) -> torch.Tensor:
            params.seqlen_offset = seqlen_offset  # > 0: every layer takes its single-token step
            logits = self.model(tokens.unsqueeze(1), inference_params=params, num_last_tokens=1).logits
            return logits[:, -1, :self.vocab_size]

        return params, step

    def _prefill(self, batch: list[_Row], prompts: Sequence[Sequence[int]], params: InferenceParams) -> torch.Tensor:
        """Run every distinct prompt of the batch through the model, copy the resulting per-layer
        states into the batch's rows, and return each row's next-token logits."""
        from mamba_ssm.utils.generation import InferenceParams

        rows_of_prompt: dict[int, list[int]] = {}
        for i, row in enumerate(batch):
            rows_of_prompt.setdefault(row.prompt_index, []).append(i)
        by_length: dict[int, list[int]] = {}
        for prompt_index in rows_of_prompt:
            by_length.setdefault(len(prompts[prompt_index]), []).append(prompt_index)
        logits = torch.empty(len(batch), self.vocab_size, dtype=torch.float32, device=self.device)
        for group in by_length.values():
            ids = torch.tensor([list(prompts[p]) for p in group], dtype=torch.long, device=self.device)
            # Same max_seqlen as the batch's cache, so that attention layers' K/V caches have one shape.
            prefill_params = InferenceParams(
                max_seqlen=params.max_seqlen, max_batch_size=len(group),
                key_value_memory_dict=self.model.allocate_inference_cache(len(group), params.max_seqlen, self.dtype))
            group_logits = self.model(ids, inference_params=prefill_params, num_last_tokens=1).logits[:, -1]
            targets = torch.tensor([r for p in group for r in rows_of_prompt[p]], device=self.device)
            sources = torch.tensor([j for j, p in enumerate(group) for _ in rows_of_prompt[p]], device=self.device)
            for layer, states in prefill_params.key_value_memory_dict.items():
                for batch_state, prompt_state in zip(params.key_value_memory_dict[layer], states):
                    if prompt_state is not None:  # attention layers without a conv have a None conv state
                        batch_state[targets] = prompt_state[sources]
            logits[targets] = group_logits[sources, :self.vocab_size].float()
        return logits

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
