"""--data-schedule: stages of data mixtures in one run (file checks, sample order, exact resume, dry run)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import mixed_texts, tokenize_to_prefix
from kotomamba.arguments import ArgumentError, parse_args
from kotomamba.config import build_run_config, parse_run_config
from megatron_lm import helpers
from megatron_lm.blended_dataset import BlendedDataset, normalize_weights
from megatron_lm.data_builder import DataConfig, build_train_valid_test_datasets

sys.path.insert(0, str(Path(__file__).parent))
from training_worker import run_configurations  # noqa: E402

NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"]


@pytest.fixture(scope="module")
def prefixes(tokenized_corpus, sentencepiece_model, tmp_path_factory) -> list[str]:
    """Three datasets: ja, en, math (names only; the texts are mixed)."""
    directory = tmp_path_factory.mktemp("schedule_data")
    extra = [tokenize_to_prefix(mixed_texts(200, seed=seed), sentencepiece_model, directory / f"{name}_text_document")
             for seed, name in ((21, "en"), (22, "math"))]
    return [str(tokenized_corpus), *map(str, extra)]


def write_schedule(path: Path, stages: list[dict]) -> str:
    path.write_text(yaml.safe_dump({"stages": stages}))
    return str(path)


def three_stages(prefixes: list[str], unit: str = "iterations", lengths=(2, 2, 2)) -> list[dict]:
    ja, en, math = prefixes
    return [
        {"name": "ja-heavy", unit: lengths[0], "blend": f"0.85 {ja} 0.15 {en}"},
        {"name": "balanced", unit: lengths[1], "blend": [0.4, ja, 0.4, en, 0.2, math]},
        {unit: lengths[2], "blend": f"0.5 {ja} 0.3 {en} 0.2 {math}"},
    ]


# ------------------------------------------------------------------------------------------------
# The file


@pytest.mark.parametrize("content,fragments", [
    ("stages: []", ["expected a mapping with a non-empty list 'stages'"]),
    ("- a\n- b", ["expected a mapping with a non-empty list 'stages', got list"]),
    ("stages: [{tokens: 10}]", ["stage 1 (stage1): no blend"]),
    ("stages: [{blend: p, tokens: 10, samples: 3}]", ["stage 1 (stage1): give its length as exactly one of",
                                                       "tokens, samples"]),
    ("stages: [{blend: p}]", ["exactly one of tokens, samples, iterations, got none"]),
    ("stages: [{blend: p, tokens: 0}]", ["tokens must be a whole number of at least 1", "got 0"]),
    ("stages: [{blend: p, tokens: 1.5e1}, {name: x, blend: 'a b', samples: 4}]",
     ["stage 2 (x): blend lists 2 datasets without weights"]),
    ("stages: [{blend: '0.5 a 0.5', samples: 4}]", ["stage 1 (stage1): blend", "WEIGHT PREFIX pairs"]),
    ("stages: [{blend: p, samples: 4, weight: 2}]", ["unknown key(s) 'weight'"]),
    ("stages: [{name: s, blend: p, samples: 4}, {name: s, blend: q, samples: 4}]", ["stage name(s) 's' used twice"]),
    ("stages: [{blend: '0.5 p 0.5 p', samples: 4}]", ["blend names a dataset twice"]),
    ("stages: [{blend: p, samples: 4}]\nlr: 3", ["unknown top-level key(s) 'lr'"]),
    ("stages: [{blend: p, samples: 4", ["not valid YAML"]),
])
def test_a_malformed_schedule_names_the_file_the_stage_and_the_key(tmp_path, content, fragments):
    path = tmp_path / "stages.yaml"
    path.write_text(content)
    with pytest.raises(ArgumentError) as caught:
        build_run_config(parse_args(["--data-schedule", str(path), "--lr", "1e-3", *NULL]), 1)
    message = str(caught.value)
    assert message.startswith(f"--data-schedule {path}"), message
    for fragment in fragments:
        assert fragment in message, message


def test_the_schedule_excludes_the_other_data_and_length_flags(tmp_path):
    path = write_schedule(tmp_path / "s.yaml", [{"blend": "p", "samples": 8}])
    base = ["--data-schedule", path, "--lr", "1e-3", *NULL]
    with pytest.raises(ArgumentError, match="--data-schedule and --data-path are exclusive"):
        parse_args(base + ["--data-path", "p"])
    with pytest.raises(ArgumentError, match=r"sets the run's length \(the sum of its stages\): drop --train-iters"):
        parse_args(base + ["--train-iters", "5"])
    with pytest.raises(ArgumentError, match="cannot read it"):
        build_run_config(parse_args(["--data-schedule", str(tmp_path / "absent.yaml"), "--lr", "1", *NULL]), 1)


def test_stage_lengths_become_samples_and_the_run_length(tmp_path):
    path = write_schedule(tmp_path / "s.yaml", [
        {"blend": "a", "tokens": "1e4"}, {"blend": "0.5 a 0.5 b", "samples": 30}, {"blend": "b", "iterations": 3}])
    config = build_run_config(parse_args(["--data-schedule", path, "--lr", "1e-3", "--seq-length", "64",
                                          "--micro-batch-size", "2", *NULL]), 4)
    assert [stage.samples for stage in config.data.stages] == [-(-10_000 // 64), 30, 3 * 8]
    assert config.batch.train_iters == -(-(157 + 30 + 24) // 8) == 27
    assert config.optimizer.lr_decay_iters == 27
    assert [stage.name for stage in config.data.stages] == ["stage1", "stage2", "stage3"]


# ------------------------------------------------------------------------------------------------
# The samples


def test_each_stage_draws_in_megatron_order_and_continues_each_dataset(prefixes, tmp_path):
    sizes = (40, 60, 50)
    stages = [(tuple(s["blend"].split()[1::2] if isinstance(s["blend"], str) else s["blend"][1::2]),
               tuple(float(w) for w in (s["blend"].split()[0::2] if isinstance(s["blend"], str)
                                        else s["blend"][0::2])), size)
              for s, size in zip(three_stages(prefixes), sizes)]
    config = DataConfig(seq_length=16, seed=3, split="90,10,0", stages=stages)
    train, valid, test = build_train_valid_test_datasets(config, (sum(sizes), 8, 0))
    assert len(train) == sum(sizes) and test is None
    assert isinstance(valid, BlendedDataset) and len(valid.datasets) == 3  # every dataset of the schedule
    read = [0, 0, 0]  # samples of each dataset the earlier stages took
    start = 0
    for (names, weights, size) in stages:
        # Megatron's blend of this stage alone: the same dataset order
        megatron_index, megatron_sample = helpers.build_blending_indices(normalize_weights(weights), size)
        ids = [prefixes.index(name) for name in names]
        np.testing.assert_array_equal(train.dataset_index[start:start + size], np.asarray(ids)[megatron_index])
        for k in range(size):
            dataset = ids[megatron_index[k]]
            expected = train.datasets[dataset][read[dataset] + int(megatron_sample[k])]
            item = train[start + k]
            assert item["dataset_id"] == dataset
            np.testing.assert_array_equal(item["tokens"], expected["tokens"])
        for dataset in ids:
            read[dataset] += int(np.sum(np.asarray(ids)[megatron_index] == dataset))
        start += size
    # No sample of a dataset is read twice (each is within one epoch here).
    for dataset in range(3):
        drawn = train.dataset_sample_index[train.dataset_index == dataset]
        assert len(np.unique(drawn)) == len(drawn) == read[dataset]


def test_the_last_stage_runs_on_to_the_end_of_the_run(prefixes):
    config = DataConfig(seq_length=16, seed=3, split="100,0,0", stages=[((prefixes[0],), (1.0,), 10),
                                                                          ((prefixes[1],), (1.0,), 5)])
    train, _, _ = build_train_valid_test_datasets(config, (20, 0, 0))
    assert len(train) == 20 and list(train.dataset_index[10:]) == [1] * 10


# ------------------------------------------------------------------------------------------------
# Training across stages, and resuming anywhere


@pytest.fixture(scope="module")
def schedule_argv(prefixes, tiny_mamba1_config, sentencepiece_model, tmp_path_factory) -> list[str]:
    path = write_schedule(tmp_path_factory.mktemp("schedule") / "stages.yaml", three_stages(prefixes))
    return [
        "--model", str(tiny_mamba1_config), "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", str(sentencepiece_model), "--data-schedule", path, "--split", "90,10,0",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "2e-3",
        "--lr-warmup-iters", "1", "--eval-iters", "1", "--eval-interval", "3", "--num-workers", "0", "--seed", "7",
        "--fp32",
    ]


@pytest.fixture(scope="module")
def uninterrupted(schedule_argv, single_process) -> dict:
    return run_configurations({"run": schedule_argv}, single_process)["run"]


def test_a_run_trains_through_every_stage_and_says_when_each_begins(schedule_argv, single_process, caplog):
    with caplog.at_level(logging.INFO, logger="kotomamba"):
        result = run_configurations({"run": schedule_argv}, single_process)["run"]
    assert result["iteration"] == [1, 2, 3, 4, 5, 6] and result["consumed_samples"] == 24
    starts = [line for line in caplog.text.splitlines() if "data stage" in line]
    assert len(starts) == 3
    assert "iteration 1: data stage 1/3 (ja-heavy) from sample 0: 85% " in starts[0]
    assert "iteration 3: data stage 2/3 (balanced) from sample 8: 40% " in starts[1]
    assert "iteration 5: data stage 3/3 (stage3) from sample 16" in starts[2]


@pytest.mark.parametrize("stop_at", [2, 3, 4])  # the last iteration of stage 1, the first of stage 2, and later
def test_a_resume_at_or_around_a_stage_boundary_equals_the_uninterrupted_run(schedule_argv, single_process,
                                                                             uninterrupted, stop_at, tmp_path):
    save = ["--save", str(tmp_path / "run"), "--load", str(tmp_path / "run")]
    first = run_configurations({"run": schedule_argv + save + ["--exit-interval", str(stop_at)]}, single_process)["run"]
    second = run_configurations({"run": schedule_argv + save}, single_process)["run"]
    assert first["iteration"] + second["iteration"] == uninterrupted["iteration"]
    assert first["loss"] + second["loss"] == uninterrupted["loss"]  # bitwise


def test_a_changed_schedule_is_refused_on_resume(schedule_argv, single_process, prefixes, tmp_path):
    save = ["--save", str(tmp_path / "run"), "--load", str(tmp_path / "run")]
    run_configurations({"run": schedule_argv + save + ["--exit-interval", "2"]}, single_process)
    changed = write_schedule(tmp_path / "changed.yaml", three_stages(prefixes, lengths=(1, 3, 2)))
    argv = [changed if word.endswith("stages.yaml") else word for word in schedule_argv]
    refused = run_configurations({"run": argv + save}, single_process)["run"]
    assert "--data-schedule changed" in refused["error"] and "--override-data-on-resume" in refused["error"]


# ------------------------------------------------------------------------------------------------
# The dry run


def test_the_dry_run_shows_each_stage_and_each_dataset(prefixes, tmp_path, capsys, monkeypatch):
    import pretrain

    for variable in ("WORLD_SIZE", "RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(variable, raising=False)
    path = write_schedule(tmp_path / "s.yaml", three_stages(prefixes, "tokens", (6400, 6400, 3200)))
    assert pretrain.main(["--dry-run", "--data-schedule", path, "--lr", "1e-3", "--seq-length", "64",
                          "--global-batch-size", "10", *NULL]) == 0
    report = capsys.readouterr().out
    assert f"--data-schedule {path}: 3 stage(s), --split 969,30,1" in report
    assert "stage 1 ja-heavy: 6.40k tokens, iterations 1-10: 85.0% " in report
    assert "stage 2 balanced: 6.40k tokens, iterations 11-20: 40.0% " in report
    assert "stage 3 stage3: 3.20k tokens, iterations 21-25: 50.0% " in report
    assert f"{prefixes[2]}: 1.92k tokens over the run of its " in report
    assert "iterations     25" in report
    config = parse_run_config(["--data-schedule", path, "--lr", "1", "--seq-length", "64", "--global-batch-size",
                               "10", *NULL], 1)
    assert config.batch.train_iters == 25


def test_two_processes_train_the_same_stages_and_resume_on_one(schedule_argv, single_process, uninterrupted, tmp_path):
    """The stages are counted in samples: 2 ranks (gloo) draw the same global batches, and a checkpoint
    they save at the first stage boundary resumes on 1 process (within float tolerance: reductions run
    in another order)."""
    from launching import run_worker, torchrun_command

    save = str(tmp_path / "run")
    results = run_worker(torchrun_command(2), {"two": schedule_argv + ["--save", save, "--exit-interval", "2"]},
                         tmp_path)
    assert results["two"]["iteration"] == [1, 2], results["two"]
    resumed = run_configurations({"run": schedule_argv + ["--load", save]}, single_process)["run"]
    assert resumed["iteration"] == [3, 4, 5, 6]
    assert results["two"]["loss"] + resumed["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-5)


def test_a_missing_dataset_of_a_stage_is_named_before_training_starts(prefixes, tmp_path, capsys, monkeypatch):
    import kotomamba.train
    import pretrain

    for variable in ("WORLD_SIZE", "RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(kotomamba.train, "pretrain", lambda *a, **k: pytest.fail("training started"))
    missing = str(tmp_path / "absent_text_document")
    path = write_schedule(tmp_path / "s.yaml", [{"name": "one", "samples": 8, "blend": prefixes[0]},
                                                {"name": "two", "samples": 8, "blend": f"0.5 {prefixes[1]} 0.5 {missing}"}])
    assert pretrain.main(["--data-schedule", path, "--lr", "1e-3", *NULL]) == 1
    err = capsys.readouterr().err
    assert f"--data-schedule {path}: stage two: {missing}: {missing}.bin and {missing}.idx not found" in err
