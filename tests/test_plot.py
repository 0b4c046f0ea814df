"""python -m kotomamba.plot: curves from a real short run's log, W&B offline run files and TensorBoard
events; the three readers agree; W&B records spanning file blocks are read whole; clear errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kotomamba import plot
from kotomamba.distributed import init_distributed, shutdown_distributed

sys.path.insert(0, str(Path(__file__).parent))
from test_metrics import run_with_log, training_argv, wait_for_wandb_files  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU training tests (gloo)")


@pytest.fixture(scope="module")
def short_run(tiny_mamba1_config, sentencepiece_model, tokenized_corpus, tmp_path_factory) -> Path:
    """A 4-iteration run logging everywhere: train.log, save/wandb, tb."""
    tmp = tmp_path_factory.mktemp("short_run")
    argv = training_argv(tiny_mamba1_config, sentencepiece_model, [str(tokenized_corpus)]) + [
        "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1", "--tensorboard-dir", str(tmp / "tb"),
        "--wandb-project", "kotomamba-tests", "--save", str(tmp / "save"),
    ]
    ctx = init_distributed(use_mpi=False)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("WANDB_MODE", "offline")
            patch.setenv("WANDB_SILENT", "true")
            patch.delenv("WANDB_DIR", raising=False)
            result, _ = run_with_log(ctx, argv, tmp / "train.log")
    finally:
        shutdown_distributed()
    assert "error" not in result, result
    wait_for_wandb_files(tmp / "save" / "wandb")
    return tmp


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes().startswith(PNG_SIGNATURE)
    height, width, _ = matplotlib.image.imread(path).shape
    assert (width, height) == (1200, 800)


def test_the_command_plots_a_runs_log(short_run, tmp_path):
    output = tmp_path / "curves.png"
    completed = subprocess.run([sys.executable, "-m", "kotomamba.plot", str(short_run / "train.log"), "-o", str(output)],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert f"wrote {output}" in completed.stdout
    assert_png(output)


@pytest.mark.parametrize("source", ["save/wandb", "tb"])
def test_w_and_b_and_tensorboard_directories_plot_too(short_run, source, tmp_path):
    assert plot.main([str(short_run / source), "-o", str(tmp_path / "curves.png")]) == 0
    assert_png(tmp_path / "curves.png")


def test_the_three_readers_agree(short_run):
    log, wandb, tensorboard = (plot.read_run(short_run / s) for s in ("train.log", "save/wandb", "tb"))
    assert tensorboard["train/loss"].keys() == {1, 2, 3, 4} and tensorboard["valid/loss"].keys() == {2, 4}
    for name in ("train/loss", "train/lr", "train/grad_norm", "throughput/tokens_per_s_per_gpu", "valid/loss",
                 "progress/consumed_tokens"):
        for step, value in tensorboard[name].items():
            assert wandb[name][step] == pytest.approx(value, rel=1e-6), (name, step)
            assert log[name][step] == pytest.approx(value, rel=2e-3, abs=0.5), (name, step)


def test_wandb_records_larger_than_a_file_block_are_read_whole(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="kotomamba-tests", dir=str(tmp_path), config={"size": 3000})
    rows = {step: {f"optimizer/layers.{i}/grad/l2": step + i / 7 for i in range(3000)} for step in (1, 2, 3)}
    for step, row in rows.items():
        run.log(row, step=step)
    run.finish()
    wait_for_wandb_files(tmp_path)
    (file,) = plot.wandb_files(tmp_path)
    assert file.stat().st_size > 3 * 32 * 1024  # several blocks, records split across them
    run_file = plot.read_wandb_file(file)
    assert run_file.config["size"] == 3000 and len(run_file.history) == 3
    assert plot.read_wandb(tmp_path) == {name: {step: rows[step][name] for step in rows} for name in rows[1]}


def test_unreadable_sources_are_named(tmp_path, capsys):
    assert plot.main([str(tmp_path / "missing.log")]) == 1
    assert "missing.log: no such file or directory" in capsys.readouterr().err
    assert plot.main([str(tmp_path)]) == 1
    assert "holds neither W&B run files (*.wandb) nor TensorBoard event files" in capsys.readouterr().err
    (tmp_path / "other.log").write_text("nothing to see\n")
    assert plot.main([str(tmp_path / "other.log"), "-o", str(tmp_path / "x.png")]) == 1
    assert "no kotomamba metrics found" in capsys.readouterr().err
