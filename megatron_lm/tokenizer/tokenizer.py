"""Tokenizers behind one small interface shared by preprocessing, training and inference.

The SentencePiece-based types reproduce Megatron-LM's `megatron/training/tokenizer/tokenizer.py`
semantics exactly (ids, special tokens, end-of-document id), so that data tokenized by Megatron and by
us agree token for token:

| type | encode | eod | vocab_size |
|---|---|---|---|
| SentencePieceTokenizer | splits on special-token strings, SentencePiece in between | `<EOD>` (added if missing) | pieces + added specials |
| GPTSentencePieceTokenizer | plain SentencePiece | the model's eos | pieces |
| Llama2Tokenizer | bos + plain SentencePiece | the model's eos | pieces |
| HuggingFaceTokenizer | `tokenizer(text).input_ids` (post-processor included) | eos_token_id | len(tokenizer) |
| NullTokenizer(V) | space-separated ints | V (= vocab_size - 1) | V + 1 |
"""
from __future__ import annotations

import abc
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kotomamba.errors import KotomambaError

TOKENIZER_TYPES = (
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "NullTokenizer",
)


class TokenizerError(KotomambaError, ValueError):
    """A tokenizer could not be built or could not encode its input; the message says why."""


class Tokenizer(abc.ABC):
    """What preprocessing, training and inference need from a tokenizer."""

    vocab_size: int  # number of ids encode can produce
    eod: int  # end-of-document id, appended by `--append-eod`
    pad: int | None
    bos: int | None
    name: str  # stable identity (type, model file name, checksum) recorded in checkpoints

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def __repr__(self) -> str:
        return f"<{self.name} vocab_size={self.vocab_size} eod={self.eod}>"


def same_tokenizer(name: str, other: str) -> bool:
    """Whether two tokenizer names (``Type:location:sha256[:options]``) are one tokenizer: the location's
    directory does not count, so the same files copied elsewhere (a checkpoint's tokenizer/) match."""
    def identity(text: str) -> list[str]:
        parts = text.split(":")
        return parts[:1] + parts[2:] if len(parts) >= 3 else parts

    return identity(name) == identity(other)


def _sha256_of_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _id_or_none(token_id: int | None) -> int | None:
    """SentencePiece reports a missing special piece as -1."""
    return None if token_id is None or token_id < 0 else token_id


class _SentencePieceBase(Tokenizer):
    type_name: str

    def __init__(self, model_file: str) -> None:
        import sentencepiece

        self.model_file = model_file
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(
                f"{model_file} is not a SentencePiece model (--tokenizer-model): {exc}"
            ) from None
        self.name = f"{self.type_name}:{Path(model_file).name}:{_sha256_of_files([Path(model_file)])}"

    def _required_piece(self, token_id: int, what: str) -> int:
        if token_id < 0:
            raise TokenizerError(
                f"{self.type_name} needs a {what} piece but the SentencePiece model "
                f"{self.model_file} has none (train it with {what}_id >= 0)"
            )
        return token_id


class SentencePieceTokenizer(_SentencePieceBase):
    """Megatron's `SentencePieceTokenizer`, as used by kotomamba for Japanese models.

    The special tokens <CLS>, <SEP>, <EOD>, <MASK>, the model's pad/bos/eos pieces (or <PAD>, <BOS>,
    <EOS> where the model has none) and `vocab_extra_ids` sentinels <extra_id_i> get ids: the model's
    id where the piece exists, otherwise new ids after the model's pieces. Their literal strings in the
    text encode to those ids. eod is the <EOD> id (not the model's eos).
    """

    type_name = "SentencePieceTokenizer"

    def __init__(self, model_file: str, vocab_extra_ids: int = 0) -> None:
        super().__init__(model_file)
        if vocab_extra_ids < 0:
            raise TokenizerError(f"vocab_extra_ids must be >= 0, got {vocab_extra_ids}")
        processor = self.processor
        self._vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
        # Insertion order matters: at equal positions the first special token added wins (as in Megatron).
        self._special_ids: dict[str, int] = {}

        def add_special(piece: str) -> int:
            if piece not in self._vocab:
                self._vocab[piece] = len(self._vocab)
            self._special_ids[piece] = self._vocab[piece]
            return self._vocab[piece]

        def model_piece_or(token_id: int, fallback: str) -> str:
            return processor.id_to_piece(token_id) if token_id >= 0 else fallback

        self.cls = add_special("<CLS>")
        self.sep = add_special("<SEP>")
        self.eod = add_special("<EOD>")
        self.mask = add_special("<MASK>")
        self.pad = add_special(model_piece_or(processor.pad_id(), "<PAD>"))
        self.bos = add_special(model_piece_or(processor.bos_id(), "<BOS>"))
        self.eos = add_special(model_piece_or(processor.eos_id(), "<EOS>"))
        for i in range(vocab_extra_ids):
            add_special(f"<extra_id_{i}>")
        self.vocab_size = len(self._vocab)
        self._special_pieces = {token_id: piece for piece, token_id in self._special_ids.items()}
        self._special_pattern = re.compile("|".join(re.escape(piece) for piece in self._special_ids))
        if vocab_extra_ids:
            self.name += f":extra_ids={vocab_extra_ids}"

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        for match in self._special_pattern.finditer(text):
            ids.extend(self.processor.encode(text[start : match.start()]))
            ids.append(self._special_ids[match.group()])
            start = match.end()
        ids.extend(self.processor.encode(text[start:]))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        # Megatron surrounds each special token with spaces when detokenizing.
        ids = [int(i) for i in ids]
        text = ""
        chunk_start = 0
        for position, token_id in enumerate(ids):
            if token_id in self._special_pieces:
                text += self.processor.decode(ids[chunk_start:position]) + " "
                text += self._special_pieces[token_id] + " "
                chunk_start = position + 1
        return text + self.processor.decode(ids[chunk_start:])


class GPTSentencePieceTokenizer(_SentencePieceBase):
    """Megatron's `GPTSentencePieceTokenizer`: plain SentencePiece ids, eod = the model's eos."""

    type_name = "GPTSentencePieceTokenizer"

    def __init__(self, model_file: str) -> None:
        super().__init__(model_file)
        self.vocab_size = self.processor.get_piece_size()
        self.eod = self._required_piece(self.processor.eos_id(), "eos")
        self.bos = _id_or_none(self.processor.bos_id())
        self.pad = _id_or_none(self.processor.pad_id())

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


class Llama2Tokenizer(_SentencePieceBase):
    """Megatron's `Llama2Tokenizer`: bos + SentencePiece ids (bos prepended to every document, as
    Megatron's preprocessing does), eod = the model's eos."""

    type_name = "Llama2Tokenizer"

    def __init__(self, model_file: str) -> None:
        super().__init__(model_file)
        self.vocab_size = self.processor.get_piece_size()
        self.eod = self._required_piece(self.processor.eos_id(), "eos")
        self.bos = self._required_piece(self.processor.bos_id(), "bos")
        self.pad = _id_or_none(self.processor.pad_id())

    def encode(self, text: str) -> list[int]:
        return [self.bos, *self.processor.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


# HF tokenizer files whose content defines the tokenization; model weights beside them are not hashed.
_HF_TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|.*\.model)$"
)
# A lone tokenizer.json carries no eos/bos/pad declaration; these conventional names fill the gap.
_LONE_JSON_SPECIAL_NAMES = {
    "eos_token": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[EOS]"),
    "bos_token": ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]"),
    "pad_token": ("<pad>", "<|pad|>", "[PAD]"),
}


class HuggingFaceTokenizer(Tokenizer):
    """A local Hugging Face tokenizer: a directory (AutoTokenizer) or a lone tokenizer.json.

    Never contacts a hub: HF_HUB_OFFLINE=1 is set for this process and only local paths are accepted.
    encode keeps the special tokens the tokenizer's post-processor adds (Megatron does the same);
    eod is eos_token_id, vocab_size is len(tokenizer) including added tokens.
    """

    def __init__(self, path: str) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        import transformers

        location = Path(path)
        if location.is_dir():
            try:
                self._tokenizer = transformers.AutoTokenizer.from_pretrained(
                    str(location), local_files_only=True, trust_remote_code=False
                )
            except (OSError, ValueError, KeyError) as exc:
                raise TokenizerError(
                    f"cannot load a Hugging Face tokenizer from directory {path} (--tokenizer-model): {exc}"
                ) from None
        else:
            self._tokenizer = self._load_tokenizer_json(transformers, path)
        hashed = tokenizer_files("HuggingFaceTokenizer", path)
        self.vocab_size = len(self._tokenizer)
        eod = self._tokenizer.eos_token_id
        if eod is None:
            raise TokenizerError(
                f"Hugging Face tokenizer {path} defines no eos_token, which is needed as the "
                "end-of-document id: set eos_token in its tokenizer_config.json"
            )
        self.eod = eod
        self.bos = self._tokenizer.bos_token_id
        self.pad = self._tokenizer.pad_token_id
        self.name = f"HuggingFaceTokenizer:{location.name}:{_sha256_of_files(hashed)}"

    @staticmethod
    def _load_tokenizer_json(transformers: Any, path: str) -> Any:
        import tokenizers

        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as exc:  # the Rust library raises a bare Exception for unreadable files
            raise TokenizerError(f"{path} is not a tokenizer.json file (--tokenizer-model): {exc}") from None
        vocab = backend.get_vocab(with_added_tokens=True)
        specials = {
            role: next((name for name in names if name in vocab), None)
            for role, names in _LONE_JSON_SPECIAL_NAMES.items()
        }
        return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **specials)

    def encode(self, text: str) -> list[int]:
        # verbose=False: documents longer than model_max_length are expected here, not an error.
        return self._tokenizer(text, verbose=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


class NullTokenizer(Tokenizer):
    """Megatron's `NullTokenizer(V)`: the text is space-separated ids in [0, V); eod = V, so
    vocab_size = V + 1 and eod = vocab_size - 1. For benchmarks and debugging."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 1:
            raise TokenizerError(f"NullTokenizer needs --vocab-size >= 1, got {vocab_size}")
        self.eod = vocab_size
        self.vocab_size = vocab_size + 1
        self.pad = None
        self.bos = None
        self.name = f"NullTokenizer:vocab_size={vocab_size}"

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            try:
                token_id = int(word)
            except ValueError:
                raise TokenizerError(f"NullTokenizer expects space-separated integers, got {word[:40]!r}") from None
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"NullTokenizer id {token_id} is outside [0, {self.vocab_size})")
            ids.append(token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def tokenizer_files(tokenizer_type: str, tokenizer_model: str | None) -> list[Path]:
    """The files that make up a tokenizer as this module reads them: a SentencePiece model or lone
    tokenizer.json itself, a Hugging Face directory's tokenizer files; none for NullTokenizer."""
    if tokenizer_type == "NullTokenizer" or not tokenizer_model:
        return []
    location = Path(tokenizer_model)
    if location.is_dir():
        return sorted(p for p in location.iterdir() if p.is_file() and _HF_TOKENIZER_FILES.match(p.name))
    return [location]


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
    **kw: Any,
) -> Tokenizer:
    """Build a tokenizer by its Megatron `--tokenizer-type` name.

    `tokenizer_model` is the model file (SentencePiece .model, tokenizer.json, or a HF tokenizer
    directory); `vocab_size` is used by NullTokenizer only. Extra keyword: `vocab_extra_ids`
    (SentencePieceTokenizer only).
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise TokenizerError(
            f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}"
        )
    allowed_kw = {"vocab_extra_ids"} if tokenizer_type == "SentencePieceTokenizer" else set()
    unexpected = sorted(set(kw) - allowed_kw)
    if unexpected:
        raise TokenizerError(f"{tokenizer_type} does not take option(s) {', '.join(unexpected)}")

    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise TokenizerError("NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size)

    if tokenizer_model is None:
        raise TokenizerError(f"{tokenizer_type} needs --tokenizer-model")
    if not os.path.exists(tokenizer_model):
        hint = ""
        if tokenizer_type == "HuggingFaceTokenizer":
            hint = " (Hugging Face hub names are not fetched: pass a local directory)"
        raise TokenizerError(f"tokenizer model not found: {tokenizer_model} (--tokenizer-model){hint}")
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if os.path.isdir(tokenizer_model):
        raise TokenizerError(
            f"{tokenizer_type} needs a SentencePiece .model file, got directory {tokenizer_model} (--tokenizer-model)"
        )
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model, **kw)
    if tokenizer_type == "GPTSentencePieceTokenizer":
        return GPTSentencePieceTokenizer(tokenizer_model)
    return Llama2Tokenizer(tokenizer_model)
