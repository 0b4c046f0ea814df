"""Tokenizers with Megatron-LM's `--tokenizer-type` names behind one small interface."""
from megatron_lm.tokenizer.tokenizer import (
    TOKENIZER_TYPES,
    GPTSentencePieceTokenizer,
    HuggingFaceTokenizer,
    Llama2Tokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    same_tokenizer,
    tokenizer_files,
)

__all__ = [
    "TOKENIZER_TYPES",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "Llama2Tokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "build_tokenizer",
    "same_tokenizer",
    "tokenizer_files",
]
