"""inference.py and kotomamba.generation on CPU: recurrent decoding against full forward passes, batching,
seeded sampling, the logit filters, the three model formats, and the errors a user sees."""
from __future__ import annotations

import dataclasses
import importlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kotomamba.generation import (
    Decoder,
    GenerationError,
    SamplingSettings,
    filter_logits,
    sample_tokens,
)
from kotomamba.kernels import select_kernel_backend
from kotomamba.model import build_model, load_model_config

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="these tests exercise the CPU reference backend")

VOCAB = 510  # >= the tokenizer fixtures' 454 (SentencePiece) and 502 (HF) tokens; padded to 512 rows
TINY = {
    "mamba1": ("130m", {"d_model": 64, "n_layer": 2}),
    "mamba2": ("mamba2-130m", {"d_model": 64, "n_layer": 2,
                               "ssm_cfg": {"d_state": 16, "headdim": 16, "chunk_size": 8}}),
    "hybrid": ("130m", {"d_model": 64, "n_layer": 2, "attn_layer_idx": [1],
                        "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "causal": True}}),
}
PROMPTS = [[5, 17, 300, 41, 9], [77], [12, 13, 14, 15, 16, 17, 18, 19, 20], [250, 3, 99, 100, 8]]


@pytest.fixture(scope="module", autouse=True)
def reference_backend_one_thread():
    select_kernel_backend("cpu")
    # Tiny per-step ops: threads only add synchronization (and stall badly on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inference():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("inference")


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: build_model(load_model_config(preset, VOCAB, overrides), seed=0).eval()
            for name, (preset, overrides) in TINY.items()}


def argmax_loop(model, prompt: list[int], steps: int, vocab: int = VOCAB) -> list[int]:
    """Greedy decoding the slow way: a full forward pass over the whole sequence for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1, :vocab].argmax()))
    return ids[len(prompt):]


# ----------------------------------------------------------------------------------------------
# Recurrent decoding


@pytest.mark.parametrize("name", TINY)
def test_greedy_equals_argmax_over_full_forward_passes(models, name):
    model = models[name]
    completions, stats = Decoder(model, vocab_size=VOCAB).generate(
        PROMPTS, SamplingSettings(max_new_tokens=8, greedy=True), batch_size=3)
    assert [(c.prompt_index, c.sample_index) for c in completions] == [(p, 0) for p in range(len(PROMPTS))]
    for completion in completions:
        assert completion.tokens == argmax_loop(model, PROMPTS[completion.prompt_index], 8)
        assert completion.stop_reason == "length"
    assert stats.generated_tokens == 8 * len(PROMPTS) and stats.decode_tokens == 7 * len(PROMPTS)


@pytest.mark.parametrize("name", TINY)
def test_batched_equals_one_by_one(models, name):
    decoder = Decoder(models[name], vocab_size=VOCAB)
    # Sampling: each sequence draws from its own seeded stream, so batching must not change a token.
    settings = SamplingSettings(max_new_tokens=6, temperature=1.5, repetition_penalty=1.2)
    batched, stats = decoder.generate(PROMPTS, settings, batch_size=5, num_samples=2, seed=11)
    one_by_one, single_stats = decoder.generate(PROMPTS, settings, batch_size=1, num_samples=2, seed=11)
    assert [c.tokens for c in batched] == [c.tokens for c in one_by_one]
    assert batched[0].tokens != batched[1].tokens, "the two samples of a prompt should differ"
    # Prompts of different lengths share batches, but a hybrid model's batch holds one prompt length:
    # lengths 1 (2 rows), 5 (4 rows), 9 (2 rows).
    assert (stats.batches, single_stats.batches) == ((3 if name == "hybrid" else 2), 8)
    # Greedy: separate calls, one prompt each.
    greedy = SamplingSettings(max_new_tokens=6, greedy=True)
    separately = [decoder.generate([prompt], greedy)[0][0].tokens for prompt in PROMPTS]
    assert [c.tokens for c in decoder.generate(PROMPTS, greedy, batch_size=4)[0]] == separately


def test_seeded_sampling_is_reproducible(models):
    decoder = Decoder(models["mamba1"], vocab_size=VOCAB)
    settings = SamplingSettings(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.95)
    first = [c.tokens for c in decoder.generate(PROMPTS, settings, batch_size=4, seed=3)[0]]
    again = [c.tokens for c in decoder.generate(PROMPTS, settings, batch_size=2, seed=3)[0]]
    other = [c.tokens for c in decoder.generate(PROMPTS, settings, batch_size=4, seed=4)[0]]
    assert first == again
    assert first != other


def test_generation_stops_at_eos_per_sequence(models):
    model = models["mamba2"]
    expected = [argmax_loop(model, prompt, 6) for prompt in PROMPTS[:2]]
    eos = expected[0][2]
    streamed = []
    completions, stats = Decoder(model, vocab_size=VOCAB, eos_token_ids=[eos]).generate(
        PROMPTS[:2], SamplingSettings(max_new_tokens=6, greedy=True), batch_size=2,
        on_token=lambda index, token: streamed.append((index, token)))
    generated = 0
    for index, (completion, tokens) in enumerate(zip(completions, expected)):
        cut = tokens.index(eos) if eos in tokens else 6
        assert completion.tokens == tokens[:cut]
        assert completion.stop_reason == ("eos" if cut < 6 else "length")
        assert [token for i, token in streamed if i == index] == completion.tokens
        generated += min(cut + 1, 6)  # a stop token counts as generated
    assert completions[0].stop_reason == "eos" and stats.generated_tokens == generated


def test_padding_rows_of_the_embedding_are_never_sampled(models):
    model = models["mamba1"]
    assert model.backbone.embedding.num_embeddings > VOCAB
    padding_rows = model.lm_head.weight[VOCAB:].clone()
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] = 100.0  # would win every argmax if it were considered
    try:
        completions, _ = Decoder(model, vocab_size=VOCAB).generate(
            PROMPTS[:1], SamplingSettings(max_new_tokens=4, greedy=True))
    finally:
        with torch.no_grad():
            model.lm_head.weight[VOCAB:] = padding_rows
    assert all(token < VOCAB for token in completions[0].tokens)


@pytest.mark.parametrize("prompts, message", [
    ([[1, 2], []], "prompt 1 has no tokens"),
    ([[1, 10_000]], r"prompt 0 has token id\(s\) \[10000\] outside"),
    ([], "no prompts"),
])
def test_decoder_rejects_bad_prompts(models, prompts, message):
    with pytest.raises(GenerationError, match=message):
        Decoder(models["mamba1"], vocab_size=VOCAB).generate(prompts, SamplingSettings(max_new_tokens=2))


@pytest.mark.parametrize("field, value, flag", [
    ("max_new_tokens", 0, "--max-new-tokens"), ("temperature", 0.0, "--temperature"), ("top_k", -1, "--top-k"),
    ("top_p", 0.0, "--top-p"), ("top_p", 1.5, "--top-p"), ("min_p", -0.1, "--min-p"),
    ("repetition_penalty", 0.0, "--repetition-penalty"),
])
def test_invalid_settings_name_the_flag(field, value, flag):
    with pytest.raises(GenerationError, match=f"{flag} must .* got {value}"):
        SamplingSettings(**{field: value})


# ----------------------------------------------------------------------------------------------
# Logit filters and sampling on constructed logits


def kept(scores: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isfinite(scores[0])).flatten().tolist()


def test_top_k_keeps_the_k_best():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 1.0]])
    assert kept(filter_logits(logits, SamplingSettings(top_k=2))) == [1, 3]
    assert kept(filter_logits(logits, SamplingSettings(top_k=0))) == [0, 1, 2, 3, 4]
    assert kept(filter_logits(logits, SamplingSettings(top_k=99))) == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.30, 0.05, 0.50, 0.15]]).log()
    assert kept(filter_logits(logits, SamplingSettings(top_p=0.75))) == [0, 2]  # 0.5 + 0.3 >= 0.75
    assert kept(filter_logits(logits, SamplingSettings(top_p=0.85))) == [0, 2, 3]
    assert kept(filter_logits(logits, SamplingSettings(top_p=0.1))) == [2]  # the best token always stays


def test_min_p_is_relative_to_the_most_likely_token():
    logits = torch.tensor([[0.40, 0.30, 0.19, 0.11]]).log()
    assert kept(filter_logits(logits, SamplingSettings(min_p=0.5))) == [0, 1]  # >= 0.2
    assert kept(filter_logits(logits, SamplingSettings(min_p=0.25))) == [0, 1, 2, 3]  # >= 0.1


def test_filters_apply_after_temperature_and_penalty():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.0]])
    seen = torch.tensor([[True, False, True, False]])
    scores = filter_logits(logits, SamplingSettings(repetition_penalty=2.0, temperature=0.5), seen)
    # seen positive logits are divided by the penalty, seen negative ones multiplied; then / temperature
    torch.testing.assert_close(scores, torch.tensor([[2.0, 2.0, -4.0, 0.0]]))
    # top-k after the penalty: token 0 (2.0 -> 1.0) ties token 1 and both stay
    assert kept(filter_logits(logits, SamplingSettings(repetition_penalty=2.0, top_k=1), seen)) == [0, 1]


def test_greedy_takes_argmax_after_penalty_only():
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    seen = torch.tensor([[True, False, False]])
    settings = SamplingSettings(greedy=True, repetition_penalty=2.0, top_k=1, temperature=0.1)
    assert sample_tokens(filter_logits(logits, settings, seen), None).tolist() == [1]


def test_inverse_cdf_sampling():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    scores = probs.log().expand(5, 4)
    uniforms = torch.tensor([0.0, 0.49, 0.51, 0.79, 0.999999])
    assert sample_tokens(scores, uniforms).tolist() == [0, 0, 1, 1, 2]
    draws = sample_tokens(probs.log().expand(20_000, 4), torch.rand(20_000, generator=torch.Generator().manual_seed(0)))
    frequencies = torch.bincount(draws, minlength=4).float() / 20_000
    torch.testing.assert_close(frequencies, probs, atol=0.015, rtol=0)
    assert sample_tokens(probs.log().unsqueeze(0), torch.tensor([1.0])).tolist() == [2]  # never a zero-mass token


# ----------------------------------------------------------------------------------------------
# Model directories and the command line


def save_mamba_ssm_dir(model, directory: Path) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in model.state_dict().items() if key != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(model.config)))
    return directory


@pytest.fixture(scope="module")
def mamba_ssm_dir(tmp_path_factory, models, sentencepiece_model) -> Path:
    directory = save_mamba_ssm_dir(models["mamba1"], tmp_path_factory.mktemp("mamba_ssm") / "model")
    shutil.copy(sentencepiece_model, directory / "tokenizer.model")
    return directory


def run_cli(inference, argv: list[str], capsys, stdin: str = "") -> tuple[int, str, str]:
    try:
        code = inference.main(argv, stdin=io.StringIO(stdin))
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cli_streams_one_prompt_from_a_mamba_ssm_directory(inference, mamba_ssm_dir, models, capsys, tmp_path):
    from megatron_lm.tokenizer import build_tokenizer

    output = tmp_path / "out.jsonl"
    code, out, err = run_cli(inference, ["--load", str(mamba_ssm_dir), "--prompt", "東京は日本の", "--greedy",
                                         "--max-new-tokens", "6", "--output", str(output)], capsys)
    assert code == 0, err
    assert "mamba-ssm model" in err and "tokens/s" in err
    [record] = read_jsonl(output)
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(mamba_ssm_dir / "tokenizer.model"))
    prompt_ids = tokenizer.encode("東京は日本の")
    expected = argmax_loop(models["mamba1"], prompt_ids, 6, vocab=tokenizer.vocab_size)
    stops = [i for i, token in enumerate(expected) if token in inference.stop_token_ids(tokenizer)]
    expected = expected[:stops[0]] if stops else expected
    assert record["completion"] == inference.completion_text(tokenizer, prompt_ids, expected)
    assert record["prompt"] == "東京は日本の" and record["prompt_tokens"] == len(prompt_ids)
    assert record["completion_tokens"] == len(expected) and record["stop_reason"] in ("eos", "length")
    assert record["decode_seconds"] >= 0 and record["prefill_seconds"] >= 0
    assert out == "東京は日本の" + record["completion"] + "\n"  # streamed: no header, the text as it grew


def test_cli_prompt_file_jsonl_samples_and_batches(inference, models, hf_tokenizer_dir, capsys, tmp_path):
    directory = save_mamba_ssm_dir(models["mamba2"], tmp_path / "model")
    shutil.copytree(hf_tokenizer_dir, directory / "tokenizer")  # a tokenizer/ subdirectory
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text('{"prompt": "Hello,\\nworld"}\n\n{"text": "Tokyo is"}\n', encoding="utf-8")
    output = tmp_path / "out.jsonl"
    argv = ["--load", str(directory), "--prompt-file", str(prompt_file), "--num-samples", "2", "--batch-size", "3",
            "--max-new-tokens", "4", "--top-k", "40", "--seed", "5", "--output", str(output)]
    code, out, err = run_cli(inference, argv, capsys)
    assert code == 0, err
    records = read_jsonl(output)
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["prompt"] for r in records] == ["Hello,\nworld", "Hello,\nworld", "Tokyo is", "Tokyo is"]
    assert "[prompt 1, sample 1, " in out and "HuggingFaceTokenizer" in err
    again = tmp_path / "again.jsonl"
    assert run_cli(inference, argv[:-1] + [str(again)], capsys)[0] == 0
    assert [r["completion"] for r in read_jsonl(again)] == [r["completion"] for r in records]


def test_cli_reads_prompt_lines_from_stdin(inference, mamba_ssm_dir, capsys, tmp_path):
    output = tmp_path / "out.jsonl"
    code, out, err = run_cli(inference, ["--load", str(mamba_ssm_dir), "--greedy", "--max-new-tokens", "2",
                                         "--batch-size", "2", "--output", str(output)],
                             capsys, stdin="first line\n\nsecond line\n")
    assert code == 0, err
    assert [r["prompt"] for r in read_jsonl(output)] == ["first line", "second line"]


@pytest.mark.parametrize("model_type", ["mamba", "mamba2"])
def test_hugging_face_directory_gives_the_same_logits(inference, hf_tokenizer_dir, model_type, capsys, tmp_path):
    import transformers

    torch.manual_seed(0)
    if model_type == "mamba":
        # A large epsilon, so that a norm left at mamba-ssm's 1e-5 would show in the logits.
        config = transformers.MambaConfig(vocab_size=510, hidden_size=64, num_hidden_layers=2, state_size=8,
                                          layer_norm_epsilon=0.1)
        hf = transformers.MambaForCausalLM(config)
    else:
        config = transformers.Mamba2Config(vocab_size=510, hidden_size=64, num_hidden_layers=2, state_size=16,
                                           num_heads=8, head_dim=16, n_groups=2, chunk_size=8)
        hf = transformers.Mamba2ForCausalLM(config)
    hf.eval()
    hf.generation_config.eos_token_id = None
    directory = tmp_path / "hf"
    hf.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_tokenizer_dir / name, directory / name)

    loaded = inference.load_model_and_tokenizer(str(directory), torch.device("cpu"), torch.float32)
    assert loaded.tokenizer.vocab_size == 502
    assert loaded.model.backbone.embedding.num_embeddings == 510  # HF's rows, unpadded
    ids = torch.randint(0, 502, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-5)
        hf_greedy = hf.generate(ids[:1, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)
    ours, _ = Decoder(loaded.model).generate([ids[0, :6].tolist()], SamplingSettings(max_new_tokens=5, greedy=True))
    assert ours[0].tokens == hf_greedy[0, 6:].tolist()
    code, out, err = run_cli(inference, ["--load", str(directory), "--prompt", "Tokyo", "--max-new-tokens", "3"],
                             capsys)
    assert code == 0 and f"Hugging Face {model_type} model" in err


def test_training_checkpoint_is_loaded_through_the_checkpoint_module(inference, models, sentencepiece_model,
                                                                     monkeypatch, capsys, tmp_path):
    run = tmp_path / "run"
    (run / "iter_0000002").mkdir(parents=True)
    (run / "latest").write_text("2")
    tokenizer_dir = tmp_path / "saved_tokenizer"
    tokenizer_dir.mkdir()
    shutil.copy(sentencepiece_model, tokenizer_dir / "tiny.model")
    calls = []

    def load_model_from_checkpoint(path: str, device: torch.device):
        calls.append((path, device))
        return models["mamba1"], {"tokenizer_dir": str(tokenizer_dir), "tokenizer_type": "SentencePieceTokenizer",
                                  "tokenizer_model": "/gone/tiny.model"}

    from kotomamba import model_loading

    monkeypatch.setattr(model_loading, "load_model_from_checkpoint", load_model_from_checkpoint)
    for path in (run, run / "iter_0000002"):
        loaded = inference.load_model_and_tokenizer(str(path), torch.device("cpu"), torch.bfloat16)
        assert loaded.tokenizer.name.startswith("SentencePieceTokenizer:tiny.model")
        assert loaded.description.startswith("kotomamba checkpoint")
        model = loaded.model
        # Rebuilt in bfloat16 the way mamba-ssm builds it: A_log and D stay float32.
        assert model.backbone.layers[0].mixer.in_proj.weight.dtype == torch.bfloat16
        assert model.backbone.layers[0].mixer.A_log.dtype == torch.float32
        assert model.lm_head.weight is model.backbone.embedding.weight
    assert [path for path, _ in calls] == [str(run), str(run / "iter_0000002")]

    def unreadable(path: str, device: torch.device):
        raise model_loading.TrainingCheckpointError(f"cannot read the model of checkpoint {path}: truncated file")

    monkeypatch.setattr(model_loading, "load_model_from_checkpoint", unreadable)
    code, _, err = run_cli(inference, ["--load", str(run), "--prompt", "x"], capsys)
    assert code == 2 and err == f"inference.py: error: cannot read the model of checkpoint {run}: truncated file\n"


@pytest.mark.slow
def test_cli_generates_from_a_real_training_run(inference, sentencepiece_model, sentencepiece_model_without_pad,
                                                capsys, tmp_path):
    from megatron_lm.indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path
    from megatron_lm.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model))
    prefix = str(tmp_path / "corpus_text_document")
    with IndexedDatasetBuilder(data_file_path(prefix)) as builder:
        for number in range(200):
            builder.add_item(tokenizer.encode(f"Document {number}: the quick brown fox.") + [tokenizer.eod])
            builder.end_document()
        builder.finalize(index_file_path(prefix))
    config = tmp_path / "model.json"
    preset, overrides = TINY["mamba1"]
    config.write_text(json.dumps({k: v for k, v in dataclasses.asdict(load_model_config(preset, 1, overrides)).items()
                                  if k != "vocab_size"}))
    save = tmp_path / "run"
    command = [sys.executable, str(REPO / "pretrain.py"), "--model", str(config), "--tokenizer-type",
               "SentencePieceTokenizer", "--tokenizer-model", str(sentencepiece_model), "--data-path", prefix,
               "--split", "100,0,0", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
               "--train-iters", "2", "--lr", "1e-3", "--eval-iters", "0", "--num-workers", "0", "--fp32",
               "--save", str(save), "--save-interval", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "out.jsonl"
    code, _, err = run_cli(inference, ["--load", str(save), "--prompt", "Document", "--max-new-tokens", "3",
                                       "--output", str(output)], capsys)
    assert code == 0, err
    assert read_jsonl(output)[0]["prompt"] == "Document"

    # Another tokenizer that fits the embedding is refused by name unless allowed; the training one is fine
    other = str(sentencepiece_model_without_pad)
    code, _, err = run_cli(inference, ["--load", str(save), "--tokenizer-model", other, "--prompt", "Document",
                                       "--max-new-tokens", "2"], capsys)
    assert code == 2 and f"--tokenizer-model {other} is SentencePieceTokenizer:nopad.model:" in err, err
    assert "was trained with SentencePieceTokenizer:tiny.model:" in err and "--allow-other-tokenizer" in err
    for extra in (["--tokenizer-model", other, "--allow-other-tokenizer"],
                  ["--tokenizer-model", str(sentencepiece_model)]):
        code, _, err = run_cli(inference, ["--load", str(save), "--prompt", "Document", "--max-new-tokens", "2",
                                           *extra], capsys)
        assert code == 0, (extra, err)


# ----------------------------------------------------------------------------------------------
# What a user sees when the input is wrong: exit code 2 and one line naming the problem


def test_missing_checkpoint_directory(inference, capsys, tmp_path):
    missing = tmp_path / "nowhere"
    code, _, err = run_cli(inference, ["--load", str(missing), "--prompt", "x"], capsys)
    assert code == 2 and err.strip() == f"inference.py: error: --load {missing}: no such directory"


def test_directory_without_model(inference, capsys, tmp_path):
    code, _, err = run_cli(inference, ["--load", str(tmp_path), "--prompt", "x"], capsys)
    assert code == 2 and "no config.json" in err and "Traceback" not in err


def test_tokenizer_larger_than_the_embedding(inference, hf_tokenizer_dir, capsys, tmp_path):
    small = build_model(load_model_config("130m", 300, {"d_model": 64, "n_layer": 2}), seed=0)
    directory = save_mamba_ssm_dir(small, tmp_path / "small")
    code, _, err = run_cli(inference, ["--load", str(directory), "--tokenizer-model", str(hf_tokenizer_dir),
                                       "--prompt", "x"], capsys)
    assert code == 2 and "tokenizer has 502 tokens" in err and "only 304 embedding rows" in err


def test_no_tokenizer_saved_with_the_model(inference, models, capsys, tmp_path):
    directory = save_mamba_ssm_dir(models["mamba1"], tmp_path / "bare")
    code, _, err = run_cli(inference, ["--load", str(directory), "--prompt", "x"], capsys)
    assert code == 2 and f"no tokenizer saved with the model in {directory}" in err and "--tokenizer-model" in err


@pytest.mark.parametrize("argv, stdin, message", [
    (["--prompt", "ok", "--prompt", ""], "", "--prompt #2 is empty"),
    ([], "\n  \n", "no prompts"),
    (["--prompt-file", "{missing}"], "", "--prompt-file {missing}: no such file"),
    (["--prompt-file", "{jsonl}"], "", "{jsonl}:2: empty prompt"),
    (["--prompt", "x", "--top-p", "1.5"], "", "--top-p must be in (0, 1]"),
    (["--prompt", "x", "--batch-size", "0"], "", "--batch-size must be a positive integer, got 0"),
    (["--prompt", "x", "--seed", "-1"], "", "--seed must be a non-negative integer, got -1"),
    (["--prompt", "x", "--output", "{tmp}/no/such/dir/out.jsonl"], "", "--output"),
])
def test_bad_input_is_named(inference, mamba_ssm_dir, capsys, tmp_path, argv, stdin, message):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "fine"}\n{"prompt": ""}\n')
    names = {"missing": tmp_path / "missing.txt", "jsonl": jsonl, "tmp": tmp_path}
    argv = [arg.format(**names) for arg in argv]
    code, _, err = run_cli(inference, ["--load", str(mamba_ssm_dir), *argv], capsys, stdin=stdin)
    assert code == 2 and message.format(**names) in err and "Traceback" not in err


def test_prompt_that_encodes_to_nothing(inference, models, capsys, tmp_path):
    directory = save_mamba_ssm_dir(models["mamba1"], tmp_path / "null")
    code, _, err = run_cli(inference, ["--load", str(directory), "--tokenizer-type", "NullTokenizer",
                                       "--prompt", " "], capsys)
    assert code == 2 and "--prompt #1: the prompt encodes to no tokens" in err
    code, out, err = run_cli(inference, ["--load", str(directory), "--tokenizer-type", "NullTokenizer",
                                         "--prompt", "5 6 7", "--max-new-tokens", "2"], capsys)
    assert code == 0, err


# ----------------------------------------------------------------------------------------------
# Scripts


@pytest.mark.skipif(shutil.which("shellcheck") is None and not (Path(sys.executable).parent / "shellcheck").exists(),
                    reason="shellcheck is not installed")
def test_inference_test_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, str(REPO / "scripts" / "inference_test.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_decode_throughput_benchmark_smoke(inference, tmp_path):  # inference: the repository on sys.path
    benchmark = importlib.import_module("benchmarks.decode_throughput")
    report = tmp_path / "benchmarks.md"
    assert benchmark.main(["--tiny", "--report", str(report)]) == 0
    text = report.read_text()
    assert "<!-- BEGIN decode_throughput -->" in text
    # float32: HF and ours pick the same greedy tokens, all 8 of every sequence.
    assert "| tiny | 4 |" in text and "| 4/4 | 8.0/8 |" in text
