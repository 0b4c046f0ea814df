"""Train a SentencePiece unigram tokenizer on the "text" field of JSONL files.

    python scripts/demo/train_tokenizer.py --input data/demo/corpus.jsonl --vocab-size 4000 \
        --output runs/demo/tokenizer/demo.model

Byte fallback keeps every character encodable (Japanese rarely-seen kanji, emoji); identity
normalization keeps round trips exact. <pad> is id 3 after <unk>, <s>, </s>.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path


def texts(paths: list[Path], key: str) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)[key]
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise SystemExit(f"train_tokenizer.py: error: {path}:{number}: no {key!r} string ({error})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", type=Path, required=True, help="JSONL files.")
    parser.add_argument("--json-key", default="text", help="The field holding the document text (default text).")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--output", type=Path, required=True, help="Where to write the .model file.")
    args = parser.parse_args(argv)
    for path in args.input:
        if not path.is_file():
            parser.error(f"--input {path} does not exist")

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=texts(args.input, args.json_key), model_writer=model, vocab_size=args.vocab_size,
        model_type="unigram", byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, pad_id=3, max_sentence_length=1 << 20, minloglevel=2,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.output.with_suffix(".model.tmp")
    temporary.write_bytes(model.getvalue())
    temporary.replace(args.output)
    print(f"wrote {args.output} ({args.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
