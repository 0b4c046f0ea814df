"""--reset-state-at-eod and --eod-mask-loss on the real mamba-ssm model (reference kernels on CPU):
packed documents do not see each other; the token after an EOD is not a target."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kotomamba.documents import document_index, packed_documents

sys.path.insert(0, str(Path(__file__).parent))
from training_worker import run_configurations  # noqa: E402

EOD = 0
VOCAB = 64


def test_document_index_counts_the_eods_before_each_position():
    tokens = torch.tensor([[5, 6, EOD, 7, 8, EOD, EOD, 9], [EOD, 1, 2, 3, 4, 5, 6, 7]])
    assert document_index(tokens, EOD).tolist() == [[0, 0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_index(tokens, EOD).dtype == torch.int32


@pytest.fixture(scope="module")
def models(tiny_mamba1_config, tiny_mamba2_config):
    from kotomamba.kernels import select_kernel_backend
    from kotomamba.model import build_model, load_model_config

    select_kernel_backend("cpu")
    return {name: build_model(load_model_config(str(path), VOCAB), seed=3).double()
            for name, path in (("mamba1", tiny_mamba1_config), ("mamba2", tiny_mamba2_config))}


def packed_and_alone(model, first_length: int, reset: bool):
    """Logits and parameter gradients (of the loss on the second document) for [A EOD | B], and for B alone."""
    generator = torch.Generator().manual_seed(first_length)
    a = torch.randint(1, VOCAB, (first_length,), generator=generator)
    b = torch.randint(1, VOCAB, (23,), generator=generator)
    packed = torch.cat([a, torch.tensor([EOD]), b])[None]
    start = first_length + 1
    weights = torch.randn(len(b), VOCAB, generator=generator, dtype=torch.float64)  # a loss that sees all logits

    def run(tokens, positions):
        model.zero_grad()
        with packed_documents(document_index(tokens, EOD) if reset else None):
            logits = model(tokens).logits[0, positions]
            (logits * weights).sum().backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    return run(packed, slice(start, None)), run(b[None], slice(None))


@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
@pytest.mark.parametrize("first_length", [5, 16, 21])  # the second document starts mid-chunk and at a chunk edge
def test_with_the_reset_the_second_document_is_computed_as_if_alone(models, name, first_length):
    (packed_logits, packed_grads), (alone_logits, alone_grads) = packed_and_alone(models[name], first_length, True)
    torch.testing.assert_close(packed_logits, alone_logits, rtol=1e-12, atol=1e-12)
    # The gradients of weights summed over positions (the norms') differ in how the sum is split: the
    # reference RMSNorm adds in fp32 even for fp64 inputs.
    for parameter, grad in alone_grads.items():
        torch.testing.assert_close(packed_grads[parameter], grad, rtol=1e-6, atol=1e-6,
                                   msg=lambda message: f"{parameter}: {message}")


@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_without_the_reset_the_first_document_leaks_into_the_second(models, name):
    (packed_logits, _), (alone_logits, _) = packed_and_alone(models[name], 16, False)
    assert not torch.allclose(packed_logits, alone_logits, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Training with both flags


@pytest.fixture(scope="module")
def argv(tiny_mamba1_config, sentencepiece_model, tokenized_corpus) -> list[str]:
    return [
        "--model", str(tiny_mamba1_config), "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", str(sentencepiece_model), "--data-path", str(tokenized_corpus),
        "--split", "90,10,0", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "1", "--lr", "2e-3", "--eval-iters", "0", "--num-workers", "0", "--seed", "7", "--fp32",
        "--grad-clip-norm", "0",
    ]


def first_step_by_hand(argv: list[str], reset: bool) -> tuple[float, float]:
    """The first global batch's loss (mean over the targets that do not follow an EOD) and gradient norm,
    from the same model and samples, with plain PyTorch."""
    from kotomamba.config import parse_run_config
    from kotomamba.model import build_model, load_model_config
    from kotomamba.train import build_datasets
    from megatron_lm.tokenizer import build_tokenizer

    config = parse_run_config(argv, 1)
    tokenizer = build_tokenizer(config.tokenizer.tokenizer_type, config.tokenizer.tokenizer_model)
    model = build_model(load_model_config(config.model.model, tokenizer.vocab_size), seed=config.data.seed)
    train, _, _ = build_datasets(config)
    samples = [train[k] for k in range(config.batch.global_batch_size)]
    tokens = torch.stack([torch.as_tensor(sample["tokens"]) for sample in samples]).long()
    labels = torch.stack([torch.as_tensor(sample["labels"]) for sample in samples]).long()
    assert (tokens == tokenizer.eod).any(), "the test needs samples with document boundaries"
    labels = labels.masked_fill(tokens == tokenizer.eod, -100)
    with packed_documents(document_index(tokens, tokenizer.eod) if reset else None):
        logits = model(tokens).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)
        loss.backward()
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    return loss.item(), norm


@pytest.mark.parametrize("reset", [False, True])
def test_eod_mask_loss_is_the_mean_over_the_targets_of_the_global_batch(argv, single_process, reset):
    flags = ["--eod-mask-loss"] + (["--reset-state-at-eod"] if reset else [])
    result = run_configurations({"run": argv + flags}, single_process)["run"]
    assert "error" not in result, result
    loss, norm = first_step_by_hand(argv, reset)
    assert result["loss"][0] == pytest.approx(loss, rel=1e-5)
    assert result["grad_norm"][0] == pytest.approx(norm, rel=1e-4)
    unmasked = run_configurations({"run": argv}, single_process)["run"]
    assert unmasked["loss"][0] != pytest.approx(loss, rel=1e-5)  # the flag does change what is trained


def test_the_reset_is_refused_for_a_model_with_attention_layers(argv, single_process, tmp_path):
    import json

    hybrid = json.loads(Path(argv[1]).read_text())
    hybrid.update(attn_layer_idx=[1], attn_cfg={"num_heads": 2})
    path = tmp_path / "hybrid.json"
    path.write_text(json.dumps(hybrid))
    argv = [str(path) if word == argv[1] else word for word in argv]
    result = run_configurations({"run": argv + ["--reset-state-at-eod"]}, single_process)["run"]
    assert "this model has attention layers" in result["error"] and "attn_layer_idx [1]" in result["error"]
