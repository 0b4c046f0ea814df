"""The chunked cross-entropy equals the loss from full logits: values and gradients, in every precision,
on its own and through the real mamba-ssm model (the FSDP runs are in test_training.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kotomamba.kernels import select_kernel_backend
from kotomamba.loss import language_model_loss, linear_cross_entropy, training_loss
from kotomamba.model import build_model, load_model_config

VOCAB, D_MODEL = 37, 12


def problem(tokens: int, dtype: torch.dtype = torch.float32, seed: int = 0, vocab: int = VOCAB,
            hidden_scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    hidden = (hidden_scale * torch.randn(tokens, D_MODEL, generator=generator)).to(dtype).requires_grad_()
    weight = torch.randn(vocab, D_MODEL, generator=generator).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    return hidden, weight, labels


def loss_and_grads(loss_fn, hidden, weight, labels, scale: float = 1.0):
    hidden.grad = weight.grad = None
    loss = loss_fn(hidden, weight, labels)
    (loss * scale).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def full_logits_loss(hidden, weight, labels):
    return language_model_loss(F.linear(hidden, weight), labels)


def chunked(chunk_tokens: int):
    return lambda hidden, weight, labels: linear_cross_entropy(hidden, weight, labels, chunk_tokens)


def test_gradients_pass_gradcheck():
    hidden, weight, labels = problem(7, torch.float64)
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, labels, 3), (hidden, weight))


@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 19, 1000])  # one token, uneven, exact, larger than the batch
def test_fp32_equals_the_full_logits_loss(chunk_tokens):
    hidden, weight, labels = problem(19)
    expected = loss_and_grads(full_logits_loss, hidden, weight, labels, scale=3.0)
    actual = loss_and_grads(chunked(chunk_tokens), hidden, weight, labels, scale=3.0)
    for name, a, e in zip(("loss", "grad hidden", "grad weight"), actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_computes_the_logits_in_bf16_like_the_output_layer():
    hidden, weight, labels = problem(24, torch.bfloat16)
    expected = loss_and_grads(full_logits_loss, hidden, weight, labels)
    actual = loss_and_grads(chunked(5), hidden, weight, labels)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-6, atol=0)  # same bf16 logits, fp32 softmax
    assert actual[1].dtype == actual[2].dtype == torch.bfloat16
    torch.testing.assert_close(actual[1], expected[1], rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(actual[2], expected[2], rtol=2e-2, atol=1e-4)
    # Not equal to the fp32 logits' loss: the chunks really ran in bf16.
    exact = full_logits_loss(hidden.float(), weight.float(), labels)
    assert actual[0].item() != exact.item()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_fp16_autocast_scales_before_casting_so_small_gradients_survive():
    """Loss scaling under fp16 autocast: the gradients, unscaled, are those of fp32. Nearly uniform
    logits over 4096 entries and 10^4 tokens make every softmax gradient about 2.4e-8, below fp16's
    smallest number (6e-8): it survives only if the loss scale multiplies it before the cast."""
    hidden, weight, labels = problem(10_000, seed=1, vocab=4096, hidden_scale=1e-3)
    scale = 2.0 ** 12  # what dynamic loss scaling settles near; far larger overflows fp16
    with torch.autocast("cpu", dtype=torch.float16):
        loss, grad_hidden, grad_weight = loss_and_grads(chunked(4096), hidden, weight, labels, scale)
    reference = loss_and_grads(full_logits_loss, hidden, weight, labels)
    assert grad_hidden.dtype == grad_weight.dtype == torch.float32  # fp32 inputs; only the matmuls ran in fp16
    assert loss.item() == pytest.approx(reference[0].item(), rel=1e-3)
    assert relative_error(grad_hidden / scale, reference[1]) < 1e-2
    assert relative_error(grad_weight / scale, reference[2]) < 1e-2


def test_bad_chunk_size_is_refused():
    hidden, weight, labels = problem(4)
    with pytest.raises(ValueError, match="chunk_tokens must be positive, got 0"):
        linear_cross_entropy(hidden, weight, labels, 0)


@pytest.mark.parametrize("config_fixture", ["tiny_mamba1_config", "tiny_mamba2_config"])
def test_the_real_model_gets_the_same_loss_and_gradients(config_fixture, request):
    """Through mamba-ssm's MambaLMHeadModel with tied embeddings: every parameter's gradient matches."""
    select_kernel_backend(torch.device("cpu"))
    config = load_model_config(request.getfixturevalue(config_fixture), 500)
    tokens = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(tokens, -1, dims=1)
    results = {}
    for chunk_tokens in (0, 6):
        model = build_model(config, seed=0)
        loss = training_loss(model, chunk_tokens)(tokens, labels)
        loss.backward()
        results[chunk_tokens] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
        per_token = training_loss(model, chunk_tokens)(tokens, labels, reduction="none")
        results[chunk_tokens] += (per_token,)
    (full_loss, full_grads, full_per_token), (chunked_loss, chunked_grads, chunked_per_token) = results[0], results[6]
    assert chunked_per_token.shape == labels.shape  # evaluation's per-token losses, also chunked
    torch.testing.assert_close(chunked_per_token, full_per_token, rtol=1e-5, atol=1e-6)
    assert full_per_token.mean().item() == pytest.approx(full_loss, rel=1e-6)
    assert chunked_loss == pytest.approx(full_loss, rel=1e-6)
    assert model.lm_head.weight is model.backbone.embedding.weight
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
