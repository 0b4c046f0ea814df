"""Tokenizers: Megatron semantics per type, round trips, vocabulary sizes, end-of-document ids, errors."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import sentencepiece
import tokenizers

from conftest import HF_ADDED_TOKENS
from megatron_lm.tokenizer import TOKENIZER_TYPES, Tokenizer, TokenizerError, build_tokenizer


@pytest.fixture(scope="module")
def processor(sentencepiece_model: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))


@pytest.fixture(scope="module")
def plain_texts(corpus_texts: list[str]) -> list[str]:
    """Corpus documents without literal special-token strings."""
    return [t for t in corpus_texts if "<" not in t]


def test_sentencepiece_tokenizer_adds_megatron_special_tokens(sentencepiece_model, processor):
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model))
    pieces = processor.get_piece_size()
    # <CLS>, <SEP>, <EOD>, <MASK> are new, in that order; pad/bos/eos reuse the model's pieces.
    assert (tokenizer.cls, tokenizer.sep, tokenizer.eod, tokenizer.mask) == tuple(range(pieces, pieces + 4))
    assert tokenizer.vocab_size == pieces + 4
    assert (tokenizer.pad, tokenizer.bos, tokenizer.eos) == (processor.pad_id(), processor.bos_id(), processor.eos_id())
    assert tokenizer.eod != tokenizer.eos


def test_sentencepiece_tokenizer_without_pad_piece_adds_pad(sentencepiece_model_without_pad):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model_without_pad))
    assert processor.pad_id() == -1
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model_without_pad))
    pieces = processor.get_piece_size()
    assert tokenizer.pad == pieces + 4
    assert tokenizer.vocab_size == pieces + 5
    assert tokenizer.encode("<PAD>") == [tokenizer.pad]


def test_sentencepiece_tokenizer_encodes_special_strings_between_pieces(sentencepiece_model, processor):
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model))
    ids = tokenizer.encode("前半 text<EOD>後半</s><MASK>")
    expected = processor.encode("前半 text") + [tokenizer.eod] + processor.encode("後半")
    expected += [processor.eos_id()] + processor.encode("") + [tokenizer.mask] + processor.encode("")
    assert ids == expected
    # Megatron's detokenize: each special token padded by spaces, so adjacent ones get two between.
    assert tokenizer.decode(ids) == "前半 text <EOD> 後半 </s>  <MASK> "


def test_sentencepiece_tokenizer_round_trip(sentencepiece_model, processor, plain_texts):
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model))
    for text in plain_texts:
        ids = tokenizer.encode(text)
        assert ids == processor.encode(text)
        assert tokenizer.decode(ids) == text
        assert max(ids, default=0) < tokenizer.vocab_size


def test_sentencepiece_tokenizer_vocab_extra_ids(sentencepiece_model, processor):
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model), vocab_extra_ids=3)
    pieces = processor.get_piece_size()
    assert tokenizer.vocab_size == pieces + 4 + 3
    assert tokenizer.encode("<extra_id_2>") == [pieces + 4 + 2]
    assert "extra_ids=3" in tokenizer.name


def test_gpt_sentencepiece_tokenizer_is_plain_sentencepiece(sentencepiece_model, processor, corpus_texts):
    tokenizer = build_tokenizer("GPTSentencePieceTokenizer", str(sentencepiece_model))
    assert tokenizer.vocab_size == processor.get_piece_size()
    assert tokenizer.eod == processor.eos_id()
    assert (tokenizer.bos, tokenizer.pad) == (processor.bos_id(), processor.pad_id())
    for text in corpus_texts:
        ids = tokenizer.encode(text)
        assert ids == processor.encode(text)  # special strings are plain text here
        assert tokenizer.decode(ids) == text


def test_llama2_tokenizer_prepends_bos(sentencepiece_model, processor, plain_texts):
    tokenizer = build_tokenizer("Llama2Tokenizer", str(sentencepiece_model))
    assert tokenizer.vocab_size == processor.get_piece_size()
    assert (tokenizer.bos, tokenizer.eod) == (processor.bos_id(), processor.eos_id())
    assert tokenizer.encode("") == [processor.bos_id()]
    for text in plain_texts:
        ids = tokenizer.encode(text)
        assert ids == [processor.bos_id()] + processor.encode(text)
        assert tokenizer.decode(ids) == text


def test_llama2_tokenizer_needs_bos_piece(tmp_path):
    model = tmp_path / "nobos.model"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["abc def ghi"] * 50), model_prefix=str(model.with_suffix("")),
        vocab_size=12, bos_id=-1, minloglevel=2,
    )
    with pytest.raises(TokenizerError, match=r"bos piece.*nobos\.model"):
        build_tokenizer("Llama2Tokenizer", str(model))


@pytest.mark.parametrize("source", ["json", "dir"])
def test_huggingface_tokenizer_matches_tokenizers_library(source, hf_tokenizer_json, hf_tokenizer_dir, corpus_texts):
    reference = tokenizers.Tokenizer.from_file(str(hf_tokenizer_json))
    path = hf_tokenizer_json if source == "json" else hf_tokenizer_dir
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(path))
    assert tokenizer.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    assert tokenizer.vocab_size == reference.get_vocab_size(with_added_tokens=False) + len(HF_ADDED_TOKENS)
    assert tokenizer.eod == reference.token_to_id("</s>")
    assert tokenizer.bos == reference.token_to_id("<s>")
    assert tokenizer.pad == reference.token_to_id("<pad>")
    for text in corpus_texts:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text).ids
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|user|>") == [reference.token_to_id("<|user|>")]
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_huggingface_tokenizer_needs_eos(tmp_path):
    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))
    with pytest.raises(TokenizerError, match=r"no eos_token"):
        build_tokenizer("HuggingFaceTokenizer", str(path))


def test_huggingface_hub_names_are_not_fetched():
    with pytest.raises(TokenizerError, match=r"not found: org/some-model \(--tokenizer-model\).*not fetched"):
        build_tokenizer("HuggingFaceTokenizer", "org/some-model")


def test_huggingface_directory_without_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))


def test_null_tokenizer_follows_megatron():
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=100)
    assert tokenizer.vocab_size == 101
    assert tokenizer.eod == 100 == tokenizer.vocab_size - 1
    assert tokenizer.encode("5 0 99") == [5, 0, 99]
    assert tokenizer.encode("") == []
    assert tokenizer.decode([5, 0, 99]) == "5 0 99"
    with pytest.raises(TokenizerError, match="'abc'"):
        tokenizer.encode("1 abc")
    with pytest.raises(TokenizerError, match="outside"):
        tokenizer.encode("101")
    with pytest.raises(TokenizerError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")


@pytest.mark.parametrize("tokenizer_type", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"])
def test_missing_or_wrong_model_file(tokenizer_type, tmp_path):
    missing = tmp_path / "missing.model"
    with pytest.raises(TokenizerError, match=rf"{missing}.*--tokenizer-model"):
        build_tokenizer(tokenizer_type, str(missing))
    with pytest.raises(TokenizerError, match="needs --tokenizer-model"):
        build_tokenizer(tokenizer_type)
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("not a model")
    with pytest.raises(TokenizerError, match=rf"{not_a_model} is not a SentencePiece model"):
        build_tokenizer(tokenizer_type, str(not_a_model))
    with pytest.raises(TokenizerError, match="directory"):
        build_tokenizer(tokenizer_type, str(tmp_path))


def test_unknown_type_and_options(sentencepiece_model):
    with pytest.raises(TokenizerError, match="GPT2BPETokenizer.*choose one of"):
        build_tokenizer("GPT2BPETokenizer", str(sentencepiece_model))
    with pytest.raises(TokenizerError, match="vocab_extra_ids"):
        build_tokenizer("Llama2Tokenizer", str(sentencepiece_model), vocab_extra_ids=2)


def test_names_identify_type_file_and_content(sentencepiece_model, sentencepiece_model_without_pad, hf_tokenizer_dir):
    names = {
        tokenizer_type: build_tokenizer(tokenizer_type, str(sentencepiece_model)).name
        for tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
    }
    assert len(set(names.values())) == 3
    for tokenizer_type, name in names.items():
        assert name.startswith(f"{tokenizer_type}:{sentencepiece_model.name}:")
        assert build_tokenizer(tokenizer_type, str(sentencepiece_model)).name == name
    other = build_tokenizer("GPTSentencePieceTokenizer", str(sentencepiece_model_without_pad)).name
    assert other.split(":")[2] != names["GPTSentencePieceTokenizer"].split(":")[2]
    assert build_tokenizer("HuggingFaceTokenizer", str(hf_tokenizer_dir)).name.startswith("HuggingFaceTokenizer:tiny-bpe:")


def test_every_type_builds_and_satisfies_the_interface(sentencepiece_model, hf_tokenizer_dir):
    models = {"HuggingFaceTokenizer": str(hf_tokenizer_dir), "NullTokenizer": None}
    for tokenizer_type in TOKENIZER_TYPES:
        tokenizer = build_tokenizer(tokenizer_type, models.get(tokenizer_type, str(sentencepiece_model)), vocab_size=50)
        assert isinstance(tokenizer, Tokenizer)
        assert 0 <= tokenizer.eod < tokenizer.vocab_size
        assert tokenizer_type in repr(tokenizer)
