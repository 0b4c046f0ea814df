"""The training loss: next-token cross-entropy, either from the model's full logits or computed a chunk
of tokens at a time from the final hidden states, so that the `batch × sequence × vocabulary` logits
(and their fp32 copy and gradient) never exist at once.

The chunked form is the same function: the output layer is applied per chunk in the compute dtype,
the log-softmax is taken in fp32 (or wider), and backward recomputes each chunk's logits (one extra output-layer
matmul) instead of keeping them. The gradient is scaled by the incoming gradient (loss scale,
accumulation) before it is cast to the compute dtype, as unfused backward does, so fp16 does not
underflow.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import register_fsdp_forward_method

# loss(tokens, labels, reduction="mean"): the mean over all tokens, "sum", or with reduction="none" each
# token's loss in the shape of `labels` (evaluation). Labels equal to IGNORE_INDEX (--eod-mask-loss) add
# nothing: 0 where reduction is "none". With token_losses=True ("mean"/"sum"), also each token's loss,
# detached, from the same forward (--log-loss-per-dataset).
LossFunction = Callable[..., torch.Tensor]
IGNORE_INDEX = -100  # PyTorch's default ignore_index


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy, computed in fp32 whatever the logits' dtype: the mean, the sum, or per token."""
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), reduction=reduction,
                           ignore_index=IGNORE_INDEX)
    return loss.view(labels.shape) if reduction == "none" else loss


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype `lm_head` would run in here: autocast's when it is on, else the inputs'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                  compute_dtype: torch.dtype, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses and log-normalizers (logsumexp of the logits) of flat `hidden` (tokens, d_model)
    and `labels` (tokens,), in fp32 or wider, the logits computed `chunk_tokens` rows at a time; with
    `masked`, IGNORE_INDEX labels get a loss of 0."""
    if masked:
        ignored, labels = labels == IGNORE_INDEX, labels.clamp_min(0)
    w = weight.to(compute_dtype)
    wide = torch.promote_types(compute_dtype, torch.float32)
    losses = torch.empty(labels.shape, dtype=wide, device=hidden.device)
    log_normalizers = torch.empty_like(losses)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, labels.numel(), chunk_tokens):
            stop = start + chunk_tokens
            logits = (hidden[start:stop].to(compute_dtype) @ w.t()).to(wide)
            log_normalizers[start:stop] = torch.logsumexp(logits, dim=-1)
            losses[start:stop] = log_normalizers[start:stop] - logits.gather(1, labels[start:stop, None]).squeeze(1)
    if masked:
        losses.masked_fill_(ignored, 0.0)
    return losses, log_normalizers


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                compute_dtype: torch.dtype, masked: bool, divisor: int) -> torch.Tensor:
        losses, log_normalizers = _token_losses(hidden, weight, labels, chunk_tokens, compute_dtype, masked)
        ctx.save_for_backward(hidden, weight, labels, log_normalizers)
        ctx.chunk_tokens, ctx.compute_dtype, ctx.masked, ctx.divisor = chunk_tokens, compute_dtype, masked, divisor
        ctx.mark_non_differentiable(losses)
        return losses.sum() / divisor, losses

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, grad_losses: torch.Tensor | None = None):
        hidden, weight, labels, log_normalizers = ctx.saved_tensors
        chunk_tokens, compute_dtype = ctx.chunk_tokens, ctx.compute_dtype
        wide = log_normalizers.dtype
        scale = grad_output.to(wide) / ctx.divisor
        if ctx.masked:
            kept, labels = (labels != IGNORE_INDEX).to(wide), labels.clamp_min(0)
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.size(0), chunk_tokens):
                stop = start + chunk_tokens
                h = hidden[start:stop].to(compute_dtype)
                # d loss / d logits = (softmax - one_hot) * scale
                grad_logits = torch.exp((h @ w.t()).to(wide) - log_normalizers[start:stop, None])
                rows = torch.arange(h.size(0), device=h.device)
                grad_logits[rows, labels[start:stop]] -= 1
                if ctx.masked:  # an ignored target adds nothing
                    grad_logits *= kept[start:stop, None]
                grad_logits = (grad_logits * scale).to(compute_dtype)
                if grad_hidden is not None:
                    grad_hidden[start:stop] = grad_logits @ w
                if grad_weight is not None:
                    grad_weight += (grad_logits.t() @ h).to(wide)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_tokens: int, reduction: str = "mean", masked: bool = False,
                         token_losses: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`language_model_loss(hidden @ weight.T, labels, reduction)` ("mean" over all tokens, or "sum")
    without materializing the logits: `hidden` (..., d_model), `weight` (vocabulary, d_model), `labels`
    (...), `chunk_tokens` tokens at a time. `masked`: labels may hold IGNORE_INDEX. `token_losses`: also
    return each token's loss (shape of `labels`, no gradient)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    compute_dtype = _compute_dtype(hidden)
    flat = hidden.reshape(-1, hidden.size(-1))
    loss, losses = _LinearCrossEntropy.apply(flat, weight, labels.reshape(-1), chunk_tokens, compute_dtype, masked,
                                             flat.size(0) if reduction == "mean" else 1)
    return (loss, losses.view(labels.shape)) if token_losses else loss


@torch.no_grad()
def per_token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            chunk_tokens: int, masked: bool = False) -> torch.Tensor:
    """Each token's loss (shape of `labels`), `chunk_tokens` at a time, without gradients (evaluation)."""
    losses, _ = _token_losses(hidden.reshape(-1, hidden.size(-1)), weight, labels.reshape(-1), chunk_tokens,
                              _compute_dtype(hidden), masked)
    return losses.view(labels.shape)


def training_loss(model: nn.Module, chunk_tokens: int = 0, masked: bool = False) -> LossFunction:
    """`loss(tokens, labels, reduction="mean")` for `model` (a mamba-ssm MambaLMHeadModel, FSDP-sharded
    or not): through the full logits when `chunk_tokens` is 0, else chunked (training and evaluation).
    `masked`: labels may hold IGNORE_INDEX (--eod-mask-loss). Call it under the run's autocast."""
    if not chunk_tokens:
        def full_loss(tokens: torch.Tensor, labels: torch.Tensor, reduction: str = "mean",
                      token_losses: bool = False):
            logits = model(tokens).logits
            if not token_losses:
                return language_model_loss(logits, labels, reduction)
            losses = language_model_loss(logits, labels, "none")
            loss = losses.sum() if reduction == "sum" else losses.mean()
            return loss, losses.detach()

        return full_loss
    if getattr(model.lm_head, "bias", None) is not None:
        raise ValueError("the chunked loss needs a bias-free lm_head, as mamba-ssm builds it")

    def chunked_loss(self: nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                     reduction: str = "mean", token_losses: bool = False):
        """The model's forward up to the final norm, then the chunked loss through its (possibly tied)
        output layer."""
        hidden = self.backbone(tokens)
        if reduction == "none":
            return per_token_cross_entropy(hidden, self.lm_head.weight, labels, chunk_tokens, masked)
        return linear_cross_entropy(hidden, self.lm_head.weight, labels, chunk_tokens, reduction, masked, token_losses)

    model.chunked_loss = chunked_loss.__get__(model)
    # FSDP all-gathers the root's parameters (embedding, final norm, lm_head) around `forward` only;
    # this makes it do the same around our method (a no-op for an unsharded model).
    register_fsdp_forward_method(model, "chunked_loss")
    return model.chunked_loss
