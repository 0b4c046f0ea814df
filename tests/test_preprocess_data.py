"""preprocess_data end to end: tokens per document, byte-identical parallel output, input errors."""
from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest

from conftest import mixed_texts, mounted_tmpfs, write_jsonl
from megatron_lm.tokenizer import build_tokenizer
from megatron_lm.tools.preprocess_data import Segment, _in_order, main, plan_partitions

REPO = Path(__file__).resolve().parent.parent
_DTYPES = {4: np.int32, 8: np.uint16}


def read_documents(prefix: str) -> tuple[int, list[list[np.ndarray]]]:
    """Parse a `.bin/.idx` pair straight from the format spec (independent of our reader):
    returns the dtype code and, per document, its sequences."""
    index = Path(prefix + ".idx").read_bytes()
    magic, version, code, sequences, doc_len = struct.unpack_from("<9sQBQQ", index, 0)
    assert (magic, version) == (b"MMIDIDX\x00\x00", 1)
    lengths = np.frombuffer(index, "<i4", sequences, 34)
    pointers = np.frombuffer(index, "<i8", sequences, 34 + 4 * sequences)
    doc_index = np.frombuffer(index, "<i8", doc_len, 34 + 12 * sequences)
    assert len(index) == 34 + 12 * sequences + 8 * doc_len
    assert doc_index[0] == 0 and doc_index[-1] == sequences
    tokens = np.frombuffer(Path(prefix + ".bin").read_bytes(), _DTYPES[code])
    itemsize = tokens.itemsize
    assert tokens.size == lengths.sum()
    sequences_tokens = [tokens[p // itemsize : p // itemsize + n] for p, n in zip(pointers, lengths)]
    return code, [sequences_tokens[a:b] for a, b in zip(doc_index[:-1], doc_index[1:])]


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def outputs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def sp_args(model: Path, source: Path | str, prefix: Path, *extra: str) -> list[str]:
    return [
        "--input", str(source), "--output-prefix", str(prefix), "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", str(model), "--log-interval", "0", *extra,
    ]


def test_sentencepiece_end_to_end(capsys, tmp_path, sentencepiece_model, corpus_jsonl, corpus_texts):
    code, out, _ = run_main(capsys, *sp_args(sentencepiece_model, corpus_jsonl, tmp_path / "ja", "--append-eod"))
    assert code == 0
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model))
    dtype_code, documents = read_documents(str(tmp_path / "ja_text_document"))
    assert dtype_code == 8  # uint16 for a small vocabulary
    assert len(documents) == len(corpus_texts)
    total = 0
    for text, sequences in zip(corpus_texts, documents):
        expected = tokenizer.encode(text)
        if not expected:
            assert sequences == []  # an empty document: an index entry, no sequence
            continue
        assert len(sequences) == 1
        assert sequences[0].tolist() == expected + [tokenizer.eod]
        total += len(expected) + 1
    assert f"{len(corpus_texts)} documents, {total} tokens, 0 skipped" in out
    assert outputs(tmp_path) == ["ja_text_document.bin", "ja_text_document.idx"]


@pytest.mark.parametrize("source", ["json", "dir"])
def test_huggingface_end_to_end(capsys, tmp_path, hf_tokenizer_json, hf_tokenizer_dir, corpus_jsonl, corpus_texts, source):
    model = hf_tokenizer_json if source == "json" else hf_tokenizer_dir
    code, _, _ = run_main(
        capsys, "--input", corpus_jsonl, "--output-prefix", tmp_path / "hf", "--tokenizer-type",
        "HuggingFaceTokenizer", "--tokenizer-model", model, "--log-interval", "0",
    )
    assert code == 0
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(model))
    _, documents = read_documents(str(tmp_path / "hf_text_document"))
    assert [sum((s.tolist() for s in d), []) for d in documents] == [tokenizer.encode(t) for t in corpus_texts]


def test_large_vocabulary_uses_int32_and_null_tokenizer_eod(capsys, tmp_path):
    source = write_jsonl(tmp_path / "ids.jsonl", ["1 2 70000", "", "5"])
    code, _, _ = run_main(
        capsys, "--input", source, "--output-prefix", tmp_path / "ids", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "70001", "--append-eod",
    )
    assert code == 0
    dtype_code, documents = read_documents(str(tmp_path / "ids_text_document"))
    assert dtype_code == 4
    assert [[s.tolist() for s in d] for d in documents] == [[[1, 2, 70000, 70001]], [], [[5, 70001]]]


def test_several_json_keys(capsys, tmp_path, sentencepiece_model):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in [("question one", "答え"), ("", "x")]))
    code, _, _ = run_main(capsys, *sp_args(sentencepiece_model, source, tmp_path / "qa", "--json-keys", "q", "a"))
    assert code == 0
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model))
    _, questions = read_documents(str(tmp_path / "qa_q_document"))
    _, answers = read_documents(str(tmp_path / "qa_a_document"))
    assert [[s.tolist() for s in d] for d in questions] == [[tokenizer.encode("question one")], []]
    assert [[s.tolist() for s in d] for d in answers] == [[tokenizer.encode("答え")], [tokenizer.encode("x")]]


@pytest.fixture(scope="module")
def sharded_inputs(tmp_path_factory) -> Path:
    """Four inputs (two gzipped) of different sizes, matched by the glob `shard*`."""
    directory = tmp_path_factory.mktemp("shards")
    for number, count in enumerate([150, 40, 0, 90]):
        texts = mixed_texts(count, seed=10 + number)
        path = write_jsonl(directory / f"shard{number}.jsonl", texts)
        if number % 2:
            path.with_suffix(".jsonl.gz").write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()
    return directory


def test_output_is_byte_identical_for_any_workers_and_partitions(capsys, tmp_path, sentencepiece_model, sharded_inputs):
    results = {}
    for workers, partitions in [(1, 1), (2, 1), (3, 3), (4, 2)]:  # (4, 2): a pool inside each partition
        prefix = tmp_path / f"w{workers}p{partitions}"
        code, _, err = run_main(
            capsys, *sp_args(sentencepiece_model, sharded_inputs / "shard*", prefix, "--append-eod"),
            "--workers", workers, "--partitions", partitions,
        )
        assert code == 0, err
        data = prefix.with_name(prefix.name + "_text_document")
        results[(workers, partitions)] = (data.with_suffix(".bin").read_bytes(), data.with_suffix(".idx").read_bytes())
    assert len(set(results.values())) == 1
    # and the documents are the shards' lines in sorted-file order
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model))
    expected = [tokenizer.encode(t) + [tokenizer.eod] for n, c in enumerate([150, 40, 0, 90]) for t in mixed_texts(c, seed=10 + n)]
    _, documents = read_documents(str(tmp_path / "w1p1_text_document"))
    assert [d[0].tolist() for d in documents] == expected


def test_plan_partitions_cuts_on_line_boundaries(tmp_path):
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b"".join(b'{"text": "%s"}\n' % (b"x" * n) for n in range(1, 60)))
    packed = tmp_path / "b.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"text": "y"}\n' * 500))
    plan = plan_partitions([str(plain), str(packed)], 4)
    assert 2 <= len(plan) <= 4
    content = plain.read_bytes()
    pieces = [s for part in plan for s in part if s.path == str(plain)]
    assert pieces[0].start == 0 and pieces[-1].end is None
    for before, after in zip(pieces, pieces[1:]):
        assert before.end == after.start and content[after.start - 1 : after.start] == b"\n"
    assert [s for part in plan for s in part if s.path == str(packed)] == [Segment(str(packed))]


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        (b'{"text": "unterminated\n', "malformed JSON: Unterminated string starting at column 10"),
        (b'{"text": "a" "b"}\n', "malformed JSON: Expecting ',' delimiter at column 14"),
        (b'{"text": "\xff\xfe broken"}\n', "invalid UTF-8"),
        (b'{"body": "no text key"}\n', "missing key 'text'"),
        (b'["a", "list"]\n', "expected a JSON object"),
        (b'{"text": 42}\n', "key 'text' holds int, not a string"),
        (b"\n", "empty line"),
        (b'{"text": "lone \\ud800 surrogate"}\n', "cannot tokenize key 'text': unpaired surrogate"),
    ],
)
@pytest.mark.parametrize("workers, partitions", [(2, 1), (2, 2)])
def test_invalid_line_stops_with_file_and_line(capsys, tmp_path, sentencepiece_model, bad_line, reason, workers, partitions):
    good = [json.dumps({"text": t}).encode() + b"\n" for t in mixed_texts(60)]
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b"".join(good[:45] + [bad_line] + good[45:]))
    (tmp_path / "out").mkdir()
    code, out, err = run_main(
        capsys, *sp_args(sentencepiece_model, source, tmp_path / "out" / "bad"), "--partitions", partitions,
        "--workers", workers,
    )
    assert code == 1
    assert f"{source}:46: {reason}" in err
    assert "Traceback" not in err and out == ""
    assert outputs(tmp_path / "out") == []  # no output, no temporary leftovers


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_gzip_is_reported(capsys, tmp_path, sentencepiece_model, workers):
    source = tmp_path / "cut.jsonl.gz"
    source.write_bytes(gzip.compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in mixed_texts(200)))[:-40])
    (tmp_path / "out").mkdir()
    code, _, err = run_main(capsys, *sp_args(sentencepiece_model, source, tmp_path / "out" / "cut"), "--workers", workers)
    assert code == 1 and f"{source}: cannot read" in err and "Traceback" not in err
    assert outputs(tmp_path / "out") == []


def test_dead_worker_raises_instead_of_hanging():
    with ProcessPoolExecutor(1) as executor:
        with pytest.raises(BrokenProcessPool):
            list(_in_order(executor, os._exit, iter([3, 4, 5]), window=2))


def test_failed_run_keeps_previous_outputs(capsys, tmp_path, sentencepiece_model, corpus_jsonl):
    prefix = tmp_path / "keep"
    assert run_main(capsys, *sp_args(sentencepiece_model, corpus_jsonl, prefix))[0] == 0
    before = {name: (tmp_path / name).read_bytes() for name in outputs(tmp_path)}
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{oops\n')
    code, _, err = run_main(capsys, *sp_args(sentencepiece_model, broken, prefix))
    assert code == 1 and f"{broken}:2:" in err
    assert {name: (tmp_path / name).read_bytes() for name in outputs(tmp_path) if name != "broken.jsonl"} == before


def test_skip_invalid_counts_skipped_lines(capsys, tmp_path, sentencepiece_model):
    texts = mixed_texts(20)
    lines = [json.dumps({"text": t}).encode() + b"\n" for t in texts]
    lines[3] = b"{not json\n"
    lines[7] = b'{"text": "\xc3("}\n'
    lines[12] = b'{"other": 1}\n'
    source = tmp_path / "mixed.jsonl"
    source.write_bytes(b"".join(lines))
    code, out, err = run_main(capsys, *sp_args(sentencepiece_model, source, tmp_path / "skip", "--skip-invalid"))
    assert code == 0
    assert "17 documents" in out and "3 skipped" in out
    for line_number in (4, 8, 13):
        assert f"{source}:{line_number}:" in err
    tokenizer = build_tokenizer("SentencePieceTokenizer", str(sentencepiece_model))
    _, documents = read_documents(str(tmp_path / "skip_text_document"))
    kept = [t for i, t in enumerate(texts) if i not in (3, 7, 12)]
    assert [d[0].tolist() for d in documents] == [tokenizer.encode(t) for t in kept]


def test_argument_errors(capsys, tmp_path, sentencepiece_model, corpus_jsonl):
    code, _, err = run_main(capsys, *sp_args(sentencepiece_model, tmp_path / "none*.jsonl", tmp_path / "x"))
    assert code == 1 and "--input" in err and "matches no file" in err
    code, _, err = run_main(capsys, *sp_args(tmp_path / "missing.model", corpus_jsonl, tmp_path / "x"))
    assert code == 1 and "missing.model" in err and "--tokenizer-model" in err
    code, _, err = run_main(capsys, *sp_args(sentencepiece_model, corpus_jsonl, tmp_path / "nodir" / "x"))
    assert code == 1 and "--output-prefix" in err
    with pytest.raises(SystemExit):
        main(sp_args(sentencepiece_model, corpus_jsonl, tmp_path / "x", "--workers", "0"))
    assert outputs(tmp_path) == []


def test_progress_log(capsys, tmp_path, sentencepiece_model, corpus_jsonl):
    args = sp_args(sentencepiece_model, corpus_jsonl, tmp_path / "log")
    args[args.index("--log-interval") + 1] = "50"
    code, _, err = run_main(capsys, *args)
    assert code == 0
    assert "100 documents" in err and "docs/s" in err and "MB/s" in err and "% of input" in err


@pytest.mark.slow
def test_runs_as_script_and_as_module(tmp_path, sentencepiece_model, corpus_jsonl):
    env = {**os.environ, "PYTHONPATH": ""}
    commands = {
        "script": [sys.executable, str(REPO / "megatron_lm/tools/preprocess_data.py")],
        "module": [sys.executable, "-m", "megatron_lm.tools.preprocess_data"],
    }
    for name, command in commands.items():
        result = subprocess.run(
            command + sp_args(sentencepiece_model, corpus_jsonl, tmp_path / name), cwd=REPO, env=env,
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "done:" in result.stdout
    assert (tmp_path / "script_text_document.bin").read_bytes() == (tmp_path / "module_text_document.bin").read_bytes()
    bad = subprocess.run(
        commands["module"] + sp_args(sentencepiece_model, tmp_path / "absent.jsonl", tmp_path / "bad"),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "absent.jsonl" in bad.stderr


def test_an_unwritable_output_directory_is_one_line_naming_it(capsys, tmp_path, sentencepiece_model, corpus_jsonl,
                                                             read_only_disk):
    code, _, err = run_main(capsys, *sp_args(sentencepiece_model, corpus_jsonl, read_only_disk / "out"))
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"cannot create files in {read_only_disk}: Read-only file system" in err
    file_as_directory = tmp_path / "a_file"
    file_as_directory.write_text("")
    code, _, err = run_main(capsys, *sp_args(sentencepiece_model, corpus_jsonl, file_as_directory / "out"))
    assert code == 1 and f"directory {file_as_directory} is not a directory" in err


@pytest.fixture
def read_only_disk(tmp_path):
    """A read-only tmpfs (where mounting is allowed: root, who ignores mode bits); skipped elsewhere."""
    yield from mounted_tmpfs(tmp_path / "read_only", "ro,size=64k")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (where mounting is allowed: root); skipped elsewhere."""
    yield from mounted_tmpfs(tmp_path / "small_disk", "size=256k")


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(capsys, tmp_path, small_disk, sentencepiece_model):
    big = write_jsonl(tmp_path / "big.jsonl", mixed_texts(4000, seed=3))  # ~1 MB of tokens, four times the disk
    code, _, err = run_main(capsys, *sp_args(sentencepiece_model, big, small_disk / "corpus"))
    assert code == 1 and "No space left on device" in err and "nothing was written" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert outputs(small_disk) == []  # no staging directory, no .bin without its .idx


def test_empty_input_is_refused_unless_allowed(capsys, tmp_path, sentencepiece_model):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, out, err = run_main(capsys, *sp_args(sentencepiece_model, empty, tmp_path / "e"))
    assert code == 1 and "0 document(s) and no tokens" in err and "--allow-empty" in err
    assert outputs(tmp_path) == ["empty.jsonl"]
    code, out, _ = run_main(capsys, *sp_args(sentencepiece_model, empty, tmp_path / "e", "--allow-empty"))
    assert code == 0 and "done: 0 documents" in out
    assert outputs(tmp_path) == ["e_text_document.bin", "e_text_document.idx", "empty.jsonl"]
