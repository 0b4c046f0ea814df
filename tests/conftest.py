"""Shared fixtures: tiny tokenizers trained on the fly and a small mixed Japanese/English corpus
(session-scoped, well under a second to build), and a one-process process group for in-process runs.
"""
from __future__ import annotations

import io
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # kotomamba's Triton kernels run in Triton's interpreter on CPU tensors; it must be chosen before
    # the kernels are defined (tests/test_selective_scan.py), and it reaches the subprocesses too.
    os.environ.setdefault("TRITON_INTERPRET", "1")

_JAPANESE = [
    "吾輩は猫である。名前はまだ無い。",
    "東京は日本の首都で、人口が多い都市です。",
    "今日は天気が良いので、公園を散歩しました。",
    "機械学習のモデルを大規模なデータで事前学習する。",
    "状態空間モデルは長い系列を効率よく扱える。",
    "富士山の高さは三千七百七十六メートルです。",
    "新しいプログラミング言語を勉強しています。",
    "桜の花が咲く季節になりました。",
]
_ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "State space models scale linearly with sequence length.",
    "Pretraining data is tokenized once and memory-mapped by every rank.",
    "Mamba uses a selective scan instead of attention.",
    "Tokyo is the capital of Japan and a very large city.",
    "Numbers like 3776 and 2024 appear in text too.",
    "A small vocabulary keeps these tests fast.",
    "Hello, world! How are you today?",
]


def mixed_texts(count: int, seed: int = 0) -> list[str]:
    """`count` documents mixing Japanese and English sentences, some multi-line, deterministic."""
    rng = random.Random(seed)
    sentences = _JAPANESE + _ENGLISH
    texts = []
    for _ in range(count):
        parts = rng.choices(sentences, k=rng.randint(1, 6))
        separator = rng.choice([" ", "\n", ""])
        texts.append(separator.join(parts))
    return texts


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for number, text in enumerate(texts):
            f.write(json.dumps({key: text, "id": number}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    """120 mixed documents plus edge cases: an empty document, an emoji (byte fallback) and a
    literal special-token string."""
    return mixed_texts(120) + ["", "絵文字 🐍 and ümlauts", "before <EOD> after </s> end"]


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory: pytest.TempPathFactory, corpus_texts: list[str]) -> Path:
    """The corpus as JSONL, one {"text": ..., "id": n} object per line."""
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", corpus_texts)


def _train_sentencepiece(path: Path, **options: object) -> Path:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(mixed_texts(400, seed=1)),
        model_writer=model,
        vocab_size=450,
        model_type="unigram",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # exact round trips, newlines included
        remove_extra_whitespaces=False,
        minloglevel=2,
        **options,
    )
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 450-piece unigram model with byte fallback: unk 0, bos <s> 1, eos </s> 2, pad <pad> 3."""
    return _train_sentencepiece(tmp_path_factory.mktemp("spm") / "tiny.model", pad_id=3)


@pytest.fixture(scope="session")
def sentencepiece_model_without_pad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like `sentencepiece_model` but with no pad piece (pad_id -1, the SentencePiece default)."""
    return _train_sentencepiece(tmp_path_factory.mktemp("spm_nopad") / "nopad.model")


HF_ADDED_TOKENS = ["<|user|>", "<|assistant|>"]


@pytest.fixture(scope="session")
def hf_tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer.json trained with <unk>, <s>, </s>, <pad> in its vocabulary and
    two special tokens added after training (so len(tokenizer) > the model's vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(mixed_texts(400, seed=2), trainer=trainer)
    tokenizer.add_special_tokens(HF_ADDED_TOKENS)
    path = tmp_path_factory.mktemp("hf_json") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, hf_tokenizer_json: Path) -> Path:
    """The same tokenizer saved with save_pretrained, loadable by AutoTokenizer (eos </s>)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(hf_tokenizer_json),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    directory = tmp_path_factory.mktemp("hf_dir") / "tiny-bpe"
    tokenizer.save_pretrained(str(directory))
    return directory


# ----------------------------------------------------------------------------------------------
# Training fixtures: a tokenized corpus and a tiny mamba-ssm config


TINY_MAMBA1 = {
    "d_model": 32, "n_layer": 2, "vocab_size": 512, "d_intermediate": 0,
    "ssm_cfg": {"layer": "Mamba1", "d_state": 8, "d_conv": 4, "expand": 2},
    "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
    "pad_vocab_size_multiple": 8, "tie_embeddings": True,
}
TINY_MAMBA2 = {
    **TINY_MAMBA1,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "d_conv": 4, "expand": 2, "headdim": 16, "chunk_size": 16},
}


def write_model_config(path: Path, values: dict) -> Path:
    path.write_text(json.dumps(values))
    return path


@pytest.fixture(scope="session")
def tiny_mamba1_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_config(tmp_path_factory.mktemp("model") / "mamba1.json", TINY_MAMBA1)


@pytest.fixture(scope="session")
def tiny_mamba2_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_config(tmp_path_factory.mktemp("model") / "mamba2.json", TINY_MAMBA2)


def tokenize_to_prefix(texts: list[str], sentencepiece_model: Path, prefix: Path) -> Path:
    """Texts → SentencePiece ids + EOD → a Megatron .bin/.idx pair at `prefix`."""
    from megatron_lm.indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path
    from megatron_lm.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model))
    with IndexedDatasetBuilder(data_file_path(str(prefix))) as builder:
        for text in texts:
            builder.add_item(tokenizer.encode(text) + [tokenizer.eod])
            builder.end_document()
        builder.finalize(index_file_path(str(prefix)))
    return prefix


@pytest.fixture(scope="session")
def tokenized_corpus(tmp_path_factory: pytest.TempPathFactory, sentencepiece_model: Path) -> Path:
    """~300 mixed documents tokenized with `sentencepiece_model`: the prefix of a .bin/.idx pair."""
    directory = tmp_path_factory.mktemp("tokenized")
    return tokenize_to_prefix(mixed_texts(300, seed=3), sentencepiece_model, directory / "corpus_text_document")


@pytest.fixture(scope="module")
def single_process():
    """A one-process gloo group for training runs inside the test process. Per module: a test that runs
    pretrain.py's main destroys the group, and the next module gets a new one."""
    from kotomamba.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed(use_mpi=False)
    yield ctx
    shutdown_distributed()


def mounted_tmpfs(mount_point: Path, options: str):
    """A tmpfs at `mount_point` for the duration (mounting needs root); skips the test where it cannot."""
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
