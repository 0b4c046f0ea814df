"""Throughput of megatron_lm/tools/preprocess_data.py on mixed Japanese/English JSONL.

Generates a synthetic corpus, trains a small SentencePiece model on part of it, then preprocesses the
corpus with 1 and 2 workers (SentencePieceTokenizer, --append-eod) and reports docs/s, MB/s, tokens/s.

    python benchmarks/preprocess_throughput.py [--megabytes 8] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import environment, markdown_table, write_section  # noqa: E402
from megatron_lm.indexed_dataset import IndexedDataset  # noqa: E402
from megatron_lm.tools.preprocess_data import main as preprocess  # noqa: E402

_JAPANESE_WORDS = (
    "日本 東京 大阪 学習 言語 モデル 状態 空間 系列 計算 効率 データ 事前 研究 開発 技術 文章 単語 "
    "情報 世界 今日 明日 天気 散歩 公園 電車 会社 学校 先生 学生 桜 富士山 料理 音楽"
).split()
_JAPANESE_PARTICLES = "は が を に で と の も から まで".split()
_ENGLISH_WORDS = (
    "the model state space sequence language data training token scan selective memory throughput "
    "tokyo japan research compute efficient linear attention layer kernel batch gradient loss"
).split()


def synthetic_document(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 30)):
        if rng.random() < 0.6:
            words = [w + rng.choice(_JAPANESE_PARTICLES) for w in rng.choices(_JAPANESE_WORDS, k=rng.randint(3, 10))]
            sentences.append("".join(words) + rng.choice(["。", "です。", "した。"]))
        else:
            words = rng.choices(_ENGLISH_WORDS, k=rng.randint(5, 16))
            sentences.append(" ".join(words).capitalize() + ".")
    return rng.choice([" ", "\n"]).join(sentences)


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """Write JSONL of about `megabytes`; returns (documents, bytes)."""
    rng = random.Random(seed)
    documents, size = 0, 0
    with open(path, "wb") as f:
        while size < megabytes * 1e6:
            line = json.dumps({"text": synthetic_document(rng)}, ensure_ascii=False).encode() + b"\n"
            f.write(line)
            size += len(line)
            documents += 1
    return documents, size


def train_tokenizer(path: Path, seed: int = 1) -> Path:
    import sentencepiece

    rng = random.Random(seed)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=(synthetic_document(rng) for _ in range(2000)),
        model_writer=model,
        vocab_size=1000,
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=8.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the fastest is reported")
    args = parser.parse_args()

    print(", ".join(f"{k} {v}" for k, v in environment().items()))
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        documents, size = write_corpus(directory / "corpus.jsonl", args.megabytes)
        model = train_tokenizer(directory / "bench.model")
        rows = []
        for workers in args.workers:
            prefix = directory / f"w{workers}"
            timings = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                code = preprocess([
                    "--input", str(directory / "corpus.jsonl"), "--output-prefix", str(prefix),
                    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(model),
                    "--append-eod", "--workers", str(workers), "--log-interval", "0",
                ])
                timings.append(time.perf_counter() - started)
                if code != 0:
                    raise SystemExit(f"preprocess_data failed with workers={workers}")
            seconds = min(timings)
            with IndexedDataset(f"{prefix}_text_document") as dataset:
                tokens = int(dataset.sequence_lengths.sum())
            rows.append([
                workers, documents, f"{size / 1e6:.1f}", tokens, f"{seconds:.2f}",
                f"{documents / seconds:,.0f}", f"{size / 1e6 / seconds:.2f}", f"{tokens / seconds:,.0f}",
            ])
    header = ["workers", "documents", "MB", "tokens", "seconds", "docs/s", "MB/s", "tokens/s"]
    table = markdown_table(header, rows)
    print(table)
    body = (
        "Synthetic mixed Japanese/English JSONL (about 60% Japanese sentences), SentencePiece unigram "
        "model with 1000 pieces and byte fallback, `--tokenizer-type SentencePieceTokenizer --append-eod`, "
        f"one partition. Best of {args.repeats} runs; seconds include starting the worker processes and "
        "writing the `.bin/.idx`. The host's 2 cores were shared with other jobs, so the 2-worker row "
        "shows process overhead more than scaling.\n\n"
        + table
    )
    write_section("preprocess_throughput", "Preprocessing throughput (preprocess_data.py)", body)


if __name__ == "__main__":
    main()
