"""Checkpoints on CPU with the real training loop: bitwise-exact resume for every checkpoint type (and
async saving), resharding 1 <-> 2 processes under torchrun, SIGTERM/SIGUSR1 save-and-exit, a SIGKILL in
the middle of a save, --keep-last-k, a full disk, an unwritable --save, and data changes on resume."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from kotomamba import checkpoint as checkpoint_module
from kotomamba import checkpoint_layout
from kotomamba.config import config_dict, parse_run_config
from kotomamba.model_loading import load_model_from_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from launching import launcher_environment, run_worker, torchrun_command  # noqa: E402
from conftest import mounted_tmpfs  # noqa: E402
from training_worker import run_configurations  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "training_worker.py"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU checkpoint tests (gloo)")
TYPES = ("SHARDED_STATE_DICT", "LOCAL_STATE_DICT", "FULL_STATE_DICT")
# What every run with --save writes beside its checkpoints (kotomamba.sinks.RunFilesSink)
RUN_FILES = ["loss_curves.png", "metrics.jsonl"]


@pytest.fixture(scope="module")

def argv(tiny_mamba1_config, sentencepiece_model, tokenized_corpus) -> list[str]:
    """4 iterations of one micro-batch each: as cheap as training gets, with warmup and decay."""
    return [
        "--model", str(tiny_mamba1_config), "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", str(sentencepiece_model), "--data-path", str(tokenized_corpus),
        "--split", "90,10,0", "--seq-length", "16", "--micro-batch-size", "4", "--global-batch-size", "4",
        "--train-iters", "4", "--lr", "2e-3", "--lr-warmup-iters", "1", "--eval-iters", "0", "--num-workers", "0",
        "--seed", "7", "--fp32",
    ]


def run(single_process, argv: list[str]) -> dict:
    return run_configurations({"run": argv}, single_process)["run"]


@pytest.fixture(scope="module")
def reference(argv, single_process) -> dict:
    """The uninterrupted 4-iteration run."""
    return run(single_process, argv)


@pytest.fixture(scope="module")
def interrupted(argv, single_process, tmp_path_factory) -> dict[str, Path]:
    """Per checkpoint type (and async): a run stopped by --exit-interval 2 after saving. --load names
    the same, not yet existing, directory: an empty --load starts fresh."""
    saves = {}
    for name, extra in {**{t: ["--checkpoint-type", t] for t in TYPES},
                        "SHARDED_async": ["--async-save"],
                        "FULL_async": ["--checkpoint-type", "FULL_STATE_DICT", "--async-save"]}.items():
        save = tmp_path_factory.mktemp("interrupted") / name
        result = run(single_process, argv + extra + ["--save", str(save), "--load", str(save), "--exit-interval", "2"])
        assert result["iteration"] == [1, 2], result
        saves[name] = save
    return saves


def assert_close(actual: list[float], expected: list[float], rtol: float = 1e-5) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a == pytest.approx(e, rel=rtol)


# ------------------------------------------------------------------------------------------------
# Exact resume, every checkpoint type


@pytest.mark.parametrize("name", [*TYPES, "SHARDED_async", "FULL_async"])
def test_stopped_and_resumed_run_is_bitwise_identical(name, argv, single_process, reference, interrupted, tmp_path):
    save = tmp_path / "run"
    shutil.copytree(interrupted[name], save)
    extra = ["--async-save"] if name.endswith("async") else []
    # The same DIR for both: automatic resume.
    resumed = run(single_process, argv + extra + ["--save", str(save), "--load", str(save)])
    assert resumed["iteration"] == [3, 4]
    assert resumed["loss"] == reference["loss"][2:]  # bitwise
    assert resumed["grad_norm"] == reference["grad_norm"][2:]
    assert resumed["consumed_samples"] == 16
    assert (save / "latest").read_text().strip() == "iter_0000004"
    assert sorted(p.name for p in save.iterdir()) == sorted(["iter_0000002", "iter_0000004", "latest", *RUN_FILES])


def test_background_save_holds_the_state_of_its_iteration(argv, single_process, reference, tmp_path):
    # Training goes on while iteration 2's checkpoint is written: it must still hold iteration 2's state.
    save = tmp_path / "run"
    continuous = run(single_process, argv + ["--save", str(save), "--save-interval", "2", "--async-save"])
    assert continuous["loss"] == reference["loss"]
    resumed = run(single_process, argv + ["--load", str(save / "iter_0000002")])
    assert resumed["loss"] == reference["loss"][2:]


def test_validation_stream_continues_where_it_stopped(argv, single_process, tmp_path, monkeypatch):
    from kotomamba import train

    losses: list[float] = []
    evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: losses.append(evaluate(*a, **k)["loss"]) or {"loss": losses[-1]})
    evaluating = argv + ["--eval-iters", "1", "--eval-interval", "1"]
    assert "error" not in run(single_process, evaluating)
    whole, losses[:] = list(losses), []
    run(single_process, evaluating + ["--save", str(tmp_path / "run"), "--exit-interval", "2"])
    run(single_process, evaluating + ["--load", str(tmp_path / "run")])
    assert len(set(whole)) == 4 and losses == whole  # 4 different validation batches, resumed in place


def test_fp16_loss_scale_and_skipped_steps_resume_exactly(argv, single_process, tmp_path):
    # Scale 2**20 overflows the first two steps (the optimizer has no state yet at the checkpoint), then
    # backs off far enough for step 3.
    fp16 = [a for a in argv if a != "--fp32"] + ["--fp16", "--initial-loss-scale", str(2.0**20), "--hysteresis", "1",
                                                 "--train-iters", "3"]
    save = tmp_path / "run"
    whole = run(single_process, fp16)
    assert whole["skipped"] == [True, True, False]
    first = run(single_process, fp16 + ["--save", str(save), "--exit-interval", "2"])
    metadata = json.loads((save / "iter_0000002" / "checkpoint.json").read_text())
    assert not metadata["has_optimizer_state"] and metadata["train_state"]["skipped_iterations"] == 2
    assert metadata["loss_scaler"]["scale"] == 2.0**18
    second = run(single_process, fp16 + ["--load", str(save)])
    for key in ("loss", "grad_norm", "skipped", "loss_scale"):
        assert first[key] + second[key] == whole[key], key


def test_exit_duration_saves_and_stops(argv, single_process, tmp_path):
    save = tmp_path / "run"
    result = run(single_process, argv + ["--save", str(save), "--exit-duration-in-mins", "1e-6"])
    assert result["iteration"] == [1]
    assert (save / "latest").read_text().strip() == "iter_0000001"


def test_checkpoint_holds_everything_a_resume_needs(argv, interrupted, sentencepiece_model):
    directory = interrupted["SHARDED_STATE_DICT"] / "iter_0000002"
    metadata = json.loads((directory / "checkpoint.json").read_text())
    assert metadata["iteration"] == 2 and metadata["world_size"] == 1
    assert metadata["train_state"] == {"iteration": 2, "consumed_samples": 8, "consumed_tokens": 128,
                                       "skipped_iterations": 0, "consecutive_skips": 0, "consumed_valid_samples": 0}
    assert metadata["kotomamba_version"] and metadata["has_optimizer_state"]
    assert metadata["tokenizer"]["name"].startswith("SentencePieceTokenizer:")
    assert (directory / "tokenizer" / Path(sentencepiece_model).name).read_bytes() == sentencepiece_model.read_bytes()
    config = parse_run_config(argv + ["--save", str(interrupted["SHARDED_STATE_DICT"]), "--load",
                                      str(interrupted["SHARDED_STATE_DICT"]), "--exit-interval", "2"], 1)
    assert yaml.safe_load((directory / "config.yaml").read_text()) == config_dict(config)
    assert json.loads((directory / "model_config.json").read_text())["d_model"] == 32
    rng = torch.load(directory / "rng" / "rank_00000.pt", weights_only=True)
    assert set(rng) >= {"python", "numpy", "torch"}
    assert (directory / "state" / ".metadata").is_file()
    assert (interrupted["FULL_STATE_DICT"] / "iter_0000002" / "state.pt").is_file()


def test_load_model_from_checkpoint_reads_every_type_alike(interrupted):
    tokens = torch.randint(0, 400, (2, 12))
    logits = {}
    for name, save in interrupted.items():
        for path in (save, save / "iter_0000002"):
            model, info = load_model_from_checkpoint(str(path), torch.device("cpu"))
            assert info["iteration"] == 2 and info["tokenizer_type"] == "SentencePieceTokenizer"
            assert Path(info["tokenizer_model"]).is_file() and Path(info["tokenizer_dir"]).is_dir()
            assert model.lm_head.weight is model.backbone.embedding.weight
            assert next(model.parameters()).dtype == torch.float32
            with torch.no_grad():
                logits[name] = model(tokens).logits
    for name, value in logits.items():
        assert torch.equal(value, logits["SHARDED_STATE_DICT"]), name


# ------------------------------------------------------------------------------------------------
# Saving: retention, failures


def test_keep_last_k_deletes_only_older_complete_checkpoints(argv, single_process, reference, tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    (save / "wandb_run_id").write_text("abc")  # other tools' files in the run directory stay
    (save / "iter_0000001_notes").mkdir()
    result = run(single_process, argv + ["--save", str(save), "--save-interval", "1", "--keep-last-k", "2"])
    assert result["loss"] == reference["loss"]  # saving changes nothing
    assert sorted(p.name for p in save.iterdir()) == sorted([
        "iter_0000001_notes", "iter_0000003", "iter_0000004", "latest", "wandb_run_id", *RUN_FILES])


def test_unwritable_save_directory_stops_before_training(argv, single_process, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run(single_process, argv + ["--save", str(blocker / "run")])
    assert "error" in result
    assert f"--save {blocker / 'run'}: cannot write there" in result["error"]


def test_full_disk_leaves_the_previous_checkpoint_as_it_was(argv, single_process, tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter

    write_data = FileSystemWriter.write_data

    def disk_full_at_iteration_2(self, plan, planner):
        if "iter_0000002" in str(self.path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return write_data(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", disk_full_at_iteration_2)
    save = tmp_path / "run"
    result = run(single_process, argv + ["--save", str(save), "--save-interval", "1"])
    assert "No space left on device" in result["error"] and "iteration 2" in result["error"]
    assert "latest: iter_0000001" in result["error"]
    assert sorted(p.name for p in save.iterdir()) == sorted(["iter_0000001", "latest", *RUN_FILES])
    assert load_model_from_checkpoint(str(save), torch.device("cpu"))[1]["iteration"] == 1


# ------------------------------------------------------------------------------------------------
# Resume rules: what may change


def test_data_changes_on_resume_are_refused_unless_overridden(argv, single_process, interrupted, tmp_path):
    load = ["--load", str(interrupted["SHARDED_STATE_DICT"])]
    refused = run(single_process, argv + load + ["--seq-length", "32"])
    assert "--seq-length 32 differs from the checkpoint's 16" in refused["error"]
    assert "--override-data-on-resume" in refused["error"]
    refused = run(single_process, argv + load + ["--split", "80,20,0"])
    assert "training samples" in refused["error"] and "--split changed" in refused["error"]
    overridden = run(single_process, argv + load + ["--seq-length", "32", "--override-data-on-resume"])
    assert overridden["iteration"] == [3, 4]


def test_global_batch_size_may_change_on_resume(argv, single_process, interrupted):
    # 8 samples consumed at GBS 4, then 2 iterations of GBS 2: 12 samples, more than --train-iters × GBS.
    result = run(single_process, argv + ["--load", str(interrupted["SHARDED_STATE_DICT"]), "--global-batch-size", "2",
                              "--micro-batch-size", "2"])
    assert result["iteration"] == [3, 4] and result["consumed_samples"] == 12


def test_another_model_is_refused(argv, single_process, interrupted, tiny_mamba2_config):
    model = argv.index("--model") + 1
    other = argv[:model] + [str(tiny_mamba2_config)] + argv[model + 1:]
    result = run(single_process, other + ["--load", str(interrupted["SHARDED_STATE_DICT"])])
    assert "holds a different model than this run builds" in result["error"] and "ssm_cfg" in result["error"]


def test_latest_naming_a_missing_checkpoint_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(checkpoint_module.TrainingCheckpointError, match="iter_0000009"):
        checkpoint_module.find_checkpoint(tmp_path)
    assert checkpoint_module.find_checkpoint(tmp_path / "missing") is None


def test_a_missing_latest_marker_is_said_when_the_newest_checkpoint_is_used(tmp_path, caplog):
    for name in ("iter_0000002", "iter_0000004"):
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpoint_module.METADATA).write_text("{}")
    with caplog.at_level(logging.WARNING, logger="kotomamba"):
        assert checkpoint_module.find_checkpoint(tmp_path) == tmp_path / "iter_0000004"
    assert f"{tmp_path} has no latest file" in caplog.text and "iter_0000004" in caplog.text


def test_load_of_a_model_or_a_foreign_checkpoint_is_not_a_fresh_start(argv, single_process, tmp_path):
    """--load pointed at a model directory or at Megatron-style iter_* directories: an error that says
    what to do, never a silent start from scratch (an empty directory still starts fresh)."""
    model_dir, megatron_dir, empty_dir = tmp_path / "model", tmp_path / "megatron", tmp_path / "empty"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (megatron_dir / "iter_0000100" / "mp_rank_00").mkdir(parents=True)
    (megatron_dir / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"")
    (megatron_dir / "latest_checkpointed_iteration.txt").write_text("100")
    empty_dir.mkdir()
    runs = {name: run(single_process, argv + ["--load", str(directory)])
            for name, directory in (("model", model_dir), ("megatron", megatron_dir), ("empty", empty_dir))}
    assert runs["model"]["error"] == (f"--load {model_dir}: {model_dir} holds a model (config.json), not a training "
                                      f"checkpoint: to start from its weights use --base-model {model_dir}")
    assert f"{megatron_dir / 'iter_0000100'} is not a kotomamba checkpoint" in runs["megatron"]["error"]
    assert "--base-model" in runs["megatron"]["error"]
    assert runs["empty"]["iteration"] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------
# Crash safety: SIGKILL while saving


def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(argv, single_process, reference, tmp_path):
    save, marker = tmp_path / "run", tmp_path / "paused"
    runs = {"killed": {"argv": argv + ["--save", str(save), "--save-interval", "1"],
                       "pause_before_publish": [2, str(marker)]}}
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    process = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "runs.json"), str(tmp_path / "out.json")],
                               env=launcher_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the save never reached its pause"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    # Fully written but unpublished: not a checkpoint.
    assert (save / ".tmp-iter_0000002" / "state" / ".metadata").is_file()
    assert (save / "latest").read_text().strip() == "iter_0000001"
    resumed = run(single_process, argv + ["--save", str(save), "--load", str(save), "--save-interval", "1"])
    assert resumed["iteration"] == [2, 3, 4]
    assert resumed["loss"] == reference["loss"][1:]
    assert sorted(p.name for p in save.iterdir()) == sorted(["iter_0000001", "iter_0000002", "iter_0000003",
                                                             "iter_0000004", "latest", *RUN_FILES])


def test_scheduler_signal_to_torchrun_saves_and_exits(argv, tmp_path):
    """SLURM-style: SIGUSR1 to the torchrun agent, which forwards it; the workers save and exit."""
    save = tmp_path / "run"
    (tmp_path / "runs.json").write_text(json.dumps({"long": argv + ["--micro-batch-size", "2", "--train-iters", "200",
                                                                    "--save", str(save), "--save-interval", "1"]}))
    command = torchrun_command(2, "--signals-to-handle", "SIGTERM,SIGUSR1", "--shutdown-timeout", "120") + [
        str(WORKER),
               str(tmp_path / "runs.json"), str(tmp_path / "results.json")]
    agent = subprocess.Popen(command, env=launcher_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (save / "latest").exists():
            assert agent.poll() is None, agent.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        agent.send_signal(signal.SIGUSR1)
        agent.wait(timeout=240)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        agent.stderr.close()
    result = json.loads((tmp_path / "results.json").read_text())["long"]  # the workers returned normally
    stopped = result["iteration"][-1]
    assert 1 <= stopped < 200
    assert (save / "latest").read_text().strip() == f"iter_{stopped:07d}"


# ------------------------------------------------------------------------------------------------
# Two processes (torchrun): resharding 1 -> 2 and 2 -> 1, async saves, signals


def test_resharding_async_saves_and_signals_with_two_processes(argv, single_process, reference, interrupted, tmp_path):
    out = tmp_path / "2proc"
    argv2 = argv + ["--micro-batch-size", "2"]  # 2 ranks × 2 samples = the global batch of 4
    bf16 = [a for a in argv2 if a != "--fp32"] + ["--bf16"]
    runs = {
        "from1": argv2 + ["--load", str(interrupted["SHARDED_STATE_DICT"]), "--save", str(out / "from1")],
        "from1_full": argv2 + ["--load", str(interrupted["FULL_STATE_DICT"]), "--sharding-strategy", "NO_SHARD"],
        "reference2": argv2,
        "save2": argv2 + ["--save", str(out / "save2"), "--exit-interval", "2"],
        "save2_full": argv2 + ["--save", str(out / "save2_full"), "--exit-interval", "2",
                              "--checkpoint-type", "FULL_STATE_DICT"],
        "async2": argv2 + ["--save", str(out / "async2"), "--exit-interval", "2", "--async-save"],
        "async2_resumed": argv2 + ["--load", str(out / "async2"), "--save", str(out / "async2"), "--async-save"],
        "sigterm": {"argv": argv2 + ["--save", str(out / "sigterm")], "signal": [2, 1, "SIGTERM"]},
        "sigusr1": {"argv": argv2, "signal": [1, 0, "SIGUSR1"]},
        # bf16 keeps A_log/D/dt_bias replicated in fp32 outside FSDP: plain tensors in the checkpoint.
        "bf16_reference": bf16,
        "bf16_first": bf16 + ["--save", str(out / "bf16"), "--exit-interval", "2"],
        "bf16_second": bf16 + ["--load", str(out / "bf16")],
    }
    results = run_worker(torchrun_command(2), runs, tmp_path)

    # 1 -> 2 processes: the same training within float tolerance (reductions are ordered differently).
    for name in ("from1", "from1_full"):
        assert results[name].get("iteration") == [3, 4], results[name]
        assert_close(results[name]["loss"], reference["loss"][2:])
    # Saving in the background and resuming on 2 processes is exact.
    assert results["async2"]["iteration"] == [1, 2] and results["async2_resumed"]["iteration"] == [3, 4]
    assert results["async2"]["loss"] + results["async2_resumed"]["loss"] == results["reference2"]["loss"]
    # A signal on one rank stops both at the same iteration, after saving: the end of the iteration it
    # arrived in (the hook sends it when iteration 2 is reported, while iteration 3 runs).
    assert results["sigterm"]["iteration"] == [1, 2, 3]
    assert (out / "sigterm" / "latest").read_text().strip() == "iter_0000003"
    assert results["sigusr1"]["iteration"] == [1, 2]  # no --save: exits without a checkpoint
    assert results["bf16_first"]["loss"] + results["bf16_second"]["loss"] == results["bf16_reference"]["loss"]

    # 2 -> 1 process.
    for name in ("save2", "save2_full"):
        saved = out / name / "iter_0000002"
        assert json.loads((saved / "checkpoint.json").read_text())["world_size"] == 2
        # Both ranks checksummed a share of the files; the merged record covers every file.
        assert json.loads((saved / "checksums.json").read_text()) == independent_checksums(saved)
        assert {"rng/rank_00000.pt", "rng/rank_00001.pt"} <= set(independent_checksums(saved))
        resumed = run(single_process, argv + ["--load", str(out / name)])
        assert resumed["iteration"] == [3, 4]
        assert_close(resumed["loss"], reference["loss"][2:])


def independent_checksums(checkpoint_dir: Path) -> dict[str, dict]:
    """Size and CRC32 of every file but checksums.json, computed here without kotomamba."""
    return {str(path.relative_to(checkpoint_dir)): {"bytes": path.stat().st_size,
                                                    "crc32": f"{zlib.crc32(path.read_bytes()):08x}"}
            for path in checkpoint_dir.rglob("*") if path.is_file() and path.name != "checksums.json"}


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints: refused with one line naming the file, never trained from scratch


class NotATensor:
    """A custom object: pickling it into a checkpoint makes loading need arbitrary unpickling."""


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _same_size_garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _custom_object(path: Path) -> None:
    torch.save({"model": {}, "optimizer": {}, "note": NotATensor()}, path)


def _no_model_state(path: Path) -> None:
    torch.save({"weights": torch.zeros(1)}, path)


def _flip_one_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


# `named_by_reader`: what the error names when checksums.json was written after the damage (a file
# written wrong, a checkpoint of an older version): the readers themselves must still say which file.
@pytest.mark.parametrize("checksums", ["recorded at save", "recomputed after the damage"])
@pytest.mark.parametrize("checkpoint_type, damaged, damage, named_by_reader", [
    ("SHARDED_STATE_DICT", "state/__0_0.distcp", _truncate, "__0_0.distcp"),
    ("SHARDED_STATE_DICT", "state/__0_0.distcp", _same_size_garbage, "state"),  # DCP does not say which shard
    ("SHARDED_STATE_DICT", "state/.metadata", _garbage, ".metadata"),
    ("FULL_STATE_DICT", "state.pt", _truncate, "state.pt"),
    ("FULL_STATE_DICT", "state.pt", _garbage, "state.pt"),
    ("FULL_STATE_DICT", "state.pt", _custom_object, "state.pt"),
    ("FULL_STATE_DICT", "state.pt", _no_model_state, "state.pt"),
    ("SHARDED_STATE_DICT", "checkpoint.json", _truncate, "checkpoint.json"),
    ("FULL_STATE_DICT", "checkpoint.json", _garbage, "checkpoint.json"),
])
def test_damaged_checkpoint_is_refused_naming_the_file(argv, single_process, interrupted, tmp_path, checkpoint_type,
                                                      damaged, damage, named_by_reader, checksums):
    copy = tmp_path / "save"
    shutil.copytree(interrupted[checkpoint_type], copy)
    checkpoint_dir = copy / "iter_0000002"
    damage(checkpoint_dir / damaged)
    named = Path(damaged).name
    if checksums == "recomputed after the damage":  # (checkpoint.json is read, and refused, before them)
        (checkpoint_dir / "checksums.json").write_text(json.dumps(independent_checksums(checkpoint_dir)))
        named = named_by_reader
    if checkpoint_type == "FULL_STATE_DICT":
        argv = argv + ["--checkpoint-type", "FULL_STATE_DICT"]
    result = run(single_process, argv + ["--load", str(copy)])
    assert "error" in result, result  # not a fresh start
    assert named in result["error"] and "\n" not in result["error"], result["error"]
    with pytest.raises(checkpoint_module.TrainingCheckpointError) as refused:
        load_model_from_checkpoint(str(copy), torch.device("cpu"))
    assert named in str(refused.value) and "\n" not in str(refused.value)
    if checksums == "recorded at save" and damaged != "checkpoint.json":
        assert f"{damaged} has changed since it was saved" in result["error"], result["error"]
    if damage is _custom_object and checksums != "recorded at save":
        assert "arbitrary unpickling" in result["error"] and "arbitrary unpickling" in str(refused.value)


@pytest.mark.parametrize("checkpoint_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_checksums_cover_every_file_and_catch_a_flipped_bit(argv, single_process, interrupted, tmp_path,
                                                            checkpoint_type):
    """A single flipped bit in the model state loads without any reader noticing; the checksum does."""
    saved = interrupted[checkpoint_type] / "iter_0000002"
    assert json.loads((saved / "checksums.json").read_text()) == independent_checksums(saved)
    copy = tmp_path / "save"
    shutil.copytree(interrupted[checkpoint_type], copy)
    state = next(p for p in sorted((copy / "iter_0000002").rglob("*")) if p.suffix in (".distcp", ".pt")
                 and "rng" not in p.parts)
    _flip_one_bit(state)
    argv = argv + ["--checkpoint-type", checkpoint_type]
    result = run(single_process, argv + ["--load", str(copy)])
    relative = state.relative_to(copy / "iter_0000002")
    expected = f"{relative} has changed since it was saved (damaged or edited): its CRC32 is"
    assert expected in result.get("error", ""), result
    with pytest.raises(checkpoint_module.TrainingCheckpointError, match=f"{relative} has changed since it was saved"):
        load_model_from_checkpoint(str(copy), torch.device("cpu"))


def test_checkpoint_saved_before_checksums_still_loads(interrupted, tmp_path):
    """Checkpoints written before checksums.json existed (no "checksums" in checkpoint.json) are read."""
    copy = tmp_path / "save"
    shutil.copytree(interrupted["SHARDED_STATE_DICT"], copy)
    directory = copy / "iter_0000002"
    metadata = json.loads((directory / "checkpoint.json").read_text())
    del metadata["checksums"]
    (directory / "checkpoint.json").write_text(json.dumps(metadata))
    (directory / "checksums.json").unlink()
    assert checkpoint_module.verify_checkpoint_files(directory, metadata) is None
    model, info = load_model_from_checkpoint(str(copy), torch.device("cpu"))
    assert info["iteration"] == 2


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_missing_or_damaged_checksums_file_is_refused(argv, single_process, interrupted, tmp_path, damage):
    copy = tmp_path / "save"
    shutil.copytree(interrupted["SHARDED_STATE_DICT"], copy)
    checksums = copy / "iter_0000002" / "checksums.json"
    checksums.unlink() if damage == "missing" else checksums.write_bytes(os.urandom(64))
    result = run(single_process, argv + ["--load", str(copy)])
    assert "checksums.json" in result.get("error", "") and "\n" not in result["error"], result


def test_damaged_rng_state_is_refused_naming_the_file(argv, single_process, interrupted, tmp_path):
    copy = tmp_path / "save"
    shutil.copytree(interrupted["SHARDED_STATE_DICT"], copy)
    _truncate(copy / "iter_0000002" / "rng" / "rank_00000.pt")
    result = run(single_process, argv + ["--load", str(copy)])
    assert "rng/rank_00000.pt" in result["error"] and "\n" not in result["error"], result


def test_iterations_without_a_save_do_not_pause_the_training_clock(argv, single_process, tmp_path, monkeypatch):
    """The meter's pause synchronizes the GPU (training work queued before it would otherwise be
    counted as checkpointing): only iterations that write or wait for a checkpoint may enter it."""
    from kotomamba import metrics

    entered = []
    real_paused = metrics.IntervalMeter.paused

    def counting_paused(self):
        entered.append(1)
        return real_paused(self)

    monkeypatch.setattr(metrics.IntervalMeter, "paused", counting_paused)
    result = run(single_process, argv + ["--save", str(tmp_path / "run"), "--save-interval", "2"])
    assert len(result["loss"]) == 4
    assert len(entered) == 2  # the saves at iterations 2 and 4


# ------------------------------------------------------------------------------------------------
# One run per save directory


def test_a_second_run_on_the_same_save_directory_is_refused_and_a_killed_runs_lock_taken_over(argv, tmp_path):
    """Two real pretrain.py processes on one --save (a job submitted twice), then the first SIGKILLed."""
    from kotomamba.run_lock import LOCK_FILE

    save = tmp_path / "run"
    command = [sys.executable, str(Path(checkpoint_module.__file__).parents[1] / "pretrain.py"), *argv,
               "--save", str(save), "--load", str(save)]
    first = subprocess.Popen([*command, "--train-iters", "100000", "--log-interval", "1000"],
                             env=launcher_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (save / LOCK_FILE).exists():
            assert first.poll() is None, first.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.1)
        holder = json.loads((save / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid and holder["host"] and holder["started"] <= holder["renewed"]
        second = subprocess.run(command, env=launcher_environment(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr[-3000:]
        assert f"--save {save} is in use by another run (pid {first.pid} on {holder['host']}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the refused run touched nothing of the running one
    finally:
        first.kill()
        first.wait()
    assert (save / LOCK_FILE).exists()  # a SIGKILL leaves the lock behind
    third = subprocess.run(command, env=launcher_environment(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the save directory's lock from a run that is gone (pid {first.pid}" in third.stderr
    assert f"process {first.pid} no longer exists on this host" in third.stderr
    assert not (save / LOCK_FILE).exists()  # released at the end


def test_run_lock_lease_and_damaged_files(tmp_path, caplog):
    from kotomamba.run_lock import LOCK_FILE, RunLock, RunLockError

    lock_path = tmp_path / LOCK_FILE
    # a live holder on another host whose lease is fresh: refused; once the lease is old: taken over
    lock_path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time(), "renewed": time.time(),
                                     "job": "SLURM_JOB_ID=42", "token": "theirs"}))
    with pytest.raises(RunLockError, match=r"in use by another run \(pid 1 on elsewhere, job SLURM_JOB_ID=42"):
        RunLock(tmp_path).acquire()
    old = time.time() - 3600
    lock_path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": old, "renewed": old, "token": "x"}))
    with caplog.at_level(logging.WARNING, logger="kotomamba"), RunLock(tmp_path, lease_seconds=600):
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert "lease was last renewed" in caplog.text and not lock_path.exists()
    # a half-written file is judged by its age; a fresh one still blocks
    lock_path.write_text('{"host": "elsew')
    with pytest.raises(RunLockError, match="in use by another run"):
        RunLock(tmp_path).acquire()
    os.utime(lock_path, (old, old))
    with RunLock(tmp_path):
        pass
    # the holder renews its lease
    with RunLock(tmp_path, renew_seconds=0.05) as lock:
        first = json.loads(lock_path.read_text())["renewed"]
        time.sleep(0.3)
        assert json.loads(lock_path.read_text())["renewed"] > first
        assert json.loads(lock_path.read_text())["token"] == lock.token


# ------------------------------------------------------------------------------------------------
# What resuming restores beyond the weights


def test_a_resumed_run_draws_the_random_numbers_the_uninterrupted_run_draws(argv, single_process, tmp_path):
    """Python, numpy and torch generators continue from the checkpoint: a step that draws (dropout, say)
    draws the same numbers resumed as uninterrupted, even in a process seeded differently."""
    import random

    import numpy as np

    from kotomamba.train import run_training

    def training(extra: list[str], seed: int) -> list[tuple[float, float, float]]:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        draws = []

        def draw(state, result):
            draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))

        run_training(parse_run_config(argv + extra, 1), single_process, draw)
        return draws

    save = tmp_path / "run"
    uninterrupted = training(["--save", str(tmp_path / "uninterrupted")], seed=1)
    first_half = training(["--save", str(save), "--exit-interval", "2"], seed=1)
    resumed = training(["--save", str(save), "--load", str(save)], seed=99)  # a new process, other seeds
    assert first_half == uninterrupted[:2]  # saving changes no draw
    assert resumed == uninterrupted[2:]


def test_each_rank_checks_its_own_share_of_the_checkpoint_files(argv, tmp_path):
    """Two processes resume; a file only rank 1 verifies is damaged: rank 1 finds it and every rank stops."""
    save = tmp_path / "run"
    argv = argv + ["--micro-batch-size", "2"]
    saved = run_worker(torchrun_command(2), {"save": argv + ["--save", str(save), "--train-iters", "2",
                                                             "--save-interval", "2"]}, tmp_path, name="save")
    assert "error" not in saved["save"], saved
    directory = save / "iter_0000002"
    names = sorted(checkpoint_module.read_checksums(directory))
    rank1_only = next(name for name in names[1::2] if (directory / name).stat().st_size > 0)
    damaged = directory / rank1_only
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size, other bytes: only the CRC32 tells
    damaged.write_bytes(bytes(content))
    resumed = run_worker(torchrun_command(2), {"resume": argv + ["--save", str(save), "--load", str(save)]},
                         tmp_path, name="resume")["resume"]
    assert resumed.get("error", "").startswith(f"cannot resume from {directory}: {damaged} has changed since it "
                                               f"was saved"), resumed
    assert resumed["error"].endswith("(rank 1)")


# ------------------------------------------------------------------------------------------------
# Disk space: a save that cannot fit is refused before anything is written


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (mounting needs root; the test is skipped where it cannot be mounted)."""
    yield from mounted_tmpfs(tmp_path / "small_disk", "size=8m")


def leave_free(directory: Path, free_bytes: int) -> None:
    """Fill `directory`'s filesystem with a ballast file until about `free_bytes` are left."""
    missing = shutil.disk_usage(directory).free - free_bytes
    with open(directory / f"ballast-{missing}", "wb") as ballast:
        ballast.write(bytes(max(0, missing)))
    assert shutil.disk_usage(directory).free <= free_bytes + 64 * 1024


def checkpoint_size(interrupted) -> int:
    return checkpoint_module._directory_bytes(interrupted["SHARDED_STATE_DICT"] / "iter_0000002")


def test_the_checkpoint_size_estimate_is_close_to_a_real_checkpoint(argv, interrupted, single_process, monkeypatch):
    from kotomamba.train import run_training

    estimates = []
    check = checkpoint_module.CheckpointManager.check_disk_space

    def recording(self, state):
        estimates.append(self.checkpoint_bytes())
        return check(self, state)

    monkeypatch.setattr(checkpoint_module.CheckpointManager, "check_disk_space", recording)
    run_training(parse_run_config(argv + ["--train-iters", "2"], 1), single_process)
    measured = checkpoint_size(interrupted)
    assert measured < estimates[0] < 1.5 * measured + checkpoint_module.SPACE_EXTRA_BYTES, (measured, estimates)


def test_a_save_that_does_not_fit_stops_the_run_and_keeps_the_last_checkpoint(argv, single_process, small_disk):
    from kotomamba.train import run_training

    save = small_disk / "run"

    def fill_after_the_first_save(state, result):
        if state.iteration == 2:  # iteration 1 was saved: leave half a checkpoint free for iteration 2's
            leave_free(small_disk, checkpoint_module._directory_bytes(save / "iter_0000001") // 2)

    with pytest.raises(checkpoint_module.TrainingCheckpointError) as caught:
        run_training(parse_run_config(argv + ["--save", str(save), "--save-interval", "1"], 1), single_process,
                     fill_after_the_first_save)
    message = str(caught.value)
    assert "not enough free space for the checkpoint of iteration 2" in message and "nothing was written" in message
    assert "latest: iter_0000001" in message and f"resume with --load {save}" in message
    assert sorted(p.name for p in save.iterdir() if p.name.startswith(("iter_", ".", "latest"))) == [
        "iter_0000001", "latest"]
    assert load_model_from_checkpoint(str(save), torch.device("cpu"))[1]["iteration"] == 1


def test_the_run_is_refused_before_training_when_its_kept_checkpoints_cannot_fit(argv, single_process, small_disk,
                                                                               interrupted, caplog):
    from kotomamba.train import run_training

    size = checkpoint_size(interrupted)
    leave_free(small_disk, int(2.5 * size))
    save = small_disk / "run"
    steps = []
    with pytest.raises(checkpoint_module.TrainingCheckpointError, match=r"--keep-last-k 2 needs room for 3 more checkpoint"):
        run_training(parse_run_config(argv + ["--save", str(save), "--save-interval", "1", "--keep-last-k", "2"], 1),
                     single_process, lambda state, result: steps.append(state.iteration))
    assert steps == [] and not any(p.name.startswith("iter_") for p in save.iterdir())
    # Keeping every checkpoint: a warning at the start, then the run stops at the save that no longer fits.
    with caplog.at_level(logging.WARNING, logger="kotomamba"), pytest.raises(
            checkpoint_module.TrainingCheckpointError, match="not enough free space for the checkpoint of iteration 3"):
        run_training(parse_run_config(argv + ["--save", str(save), "--save-interval", "1"], 1), single_process,
                     lambda state, result: steps.append(state.iteration))
    assert "holds about 2 of the 4 checkpoints" in caplog.text and "--keep-last-k" in caplog.text
    assert steps == [1, 2, 3] and (save / "latest").read_text().strip() == "iter_0000002"


def test_saves_ahead_counts_the_interval_saves_and_the_final_one():
    assert checkpoint_layout.saves_ahead(0, 4, 2) == 2 and checkpoint_layout.saves_ahead(0, 5, 2) == 3
    assert checkpoint_layout.saves_ahead(2, 4, 2) == 1 and checkpoint_layout.saves_ahead(4, 4, 2) == 0
    assert checkpoint_layout.saves_ahead(3, 10, 500) == 1
