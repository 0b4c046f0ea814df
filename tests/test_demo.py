"""The README demo, end to end at a small size: tokenizer, preprocessing, training, checkpoint, sampling."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "demo" / "corpus.jsonl"


def test_bundled_corpus_is_what_sources_md_records():
    """The corpus is the recorded public-domain text: checksum, line count and fields as documented."""
    sources = (REPO / "data" / "demo" / "SOURCES.md").read_text()
    digest = hashlib.sha256(CORPUS.read_bytes()).hexdigest()
    assert digest in sources
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    assert f"{len(rows)} JSON lines" in sources
    assert {r["lang"] for r in rows} == {"ja", "en"}
    for row in rows:
        assert set(row) == {"text", "source", "lang"} and row["text"].strip()
        assert row["source"].startswith(("夏目漱石『吾輩は猫である』", "Natsume Soseki, Botchan"))


def test_demo_script_trains_checkpoints_and_samples(tmp_path):
    env = dict(os.environ, WORK_DIR=str(tmp_path / "demo"), TRAIN_ITERS="12", SEQ_LENGTH="64",
               MICRO_BATCH_SIZE="4", GLOBAL_BATCH_SIZE="8", OMP_NUM_THREADS="1",
               MODEL_CONFIG=str(tmp_path / "model.json"))
    (tmp_path / "model.json").write_text(json.dumps({
        **json.loads((REPO / "scripts" / "demo" / "mamba-demo.json").read_text()), "d_model": 64, "n_layer": 2}))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # torchrun of this environment
    completed = subprocess.run(["bash", str(REPO / "scripts" / "demo" / "demo.sh")], env=env,
                               capture_output=True, text=True, timeout=600)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-5000:]
    losses = [float(m) for m in re.findall(r"iteration \d+/12 \| .*? \| loss ([0-9.]+)", output)]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    assert (tmp_path / "demo" / "checkpoints").is_dir()
    assert "吾輩は" in completed.stdout  # the sample starts with its prompt
