"""Metrics of a real CPU run, read back from every sink (W&B offline run files, TensorBoard events, the
log line) and compared with independent computations: a plain PyTorch loop over an unsharded model
(loss, grad norm, optimizer statistics, validation and test loss per blend component), the lr
formula, token arithmetic, and the throughput identities. Also: resuming a W&B run, flag errors, and
the loss-spike paths (non-finite steps skipped and counted, a run of them stopping the run)."""
from __future__ import annotations

import logging
import math
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from kotomamba import metrics, plot
from kotomamba.config import LoggingSection
from kotomamba.flops import flops_per_token
from kotomamba.model import load_model_config
from kotomamba.sinks import WANDB_RUN_ID_FILE, MetricLogger, MetricsSinkError

sys.path.insert(0, str(Path(__file__).parent))
from conftest import mixed_texts, tokenize_to_prefix  # noqa: E402
from reference_training import plain_training  # noqa: E402
from training_worker import run_configurations  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU training tests (gloo)")

ITERATIONS, LOG_INTERVAL, EVAL_INTERVAL = 4, 2, 2
GLOBAL_BATCH, SEQ_LENGTH = 4, 32
MAX_LR, PEAK_TFLOPS = 2e-3, 0.5
EVAL_SLEEP = 0.5  # added to every evaluation: training throughput must not see it


@pytest.fixture(scope="module")
def blend(tokenized_corpus, sentencepiece_model, tmp_path_factory) -> list[str]:
    """Two components, so validation and test report per-component losses."""
    extra = tokenize_to_prefix(mixed_texts(300, seed=11), sentencepiece_model,
                               tmp_path_factory.mktemp("extra") / "extra_text_document")
    return ["0.6", str(tokenized_corpus), "0.4", str(extra)]


def training_argv(tiny_mamba1_config, sentencepiece_model, data_path: list[str]) -> list[str]:
    return [
        "--model", str(tiny_mamba1_config), "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", str(sentencepiece_model), "--data-path", *data_path, "--split", "80,10,10",
        "--seq-length", str(SEQ_LENGTH), "--micro-batch-size", "2", "--global-batch-size", str(GLOBAL_BATCH),
        "--train-iters", str(ITERATIONS), "--lr", str(MAX_LR), "--lr-warmup-iters", "1", "--lr-decay-style", "cosine",
        "--num-workers", "0", "--seed", "7", "--fp32", "--log-interval", str(LOG_INTERVAL),
    ]


class LogCapture(logging.Handler):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.times: dict[str, float] = {}  # when each line was logged
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        line = f"[00:00:00 rank0] {record.getMessage()}"  # the shape setup_logging gives it
        self.lines.append(line)
        self.times[record.getMessage()] = record.created
        with open(self.path, "a", encoding="utf-8") as log:
            log.write(line + "\n")


def wait_for_wandb_files(directory: Path, timeout: float = 30.0) -> None:
    """W&B's writer may finish a run file shortly after `finish()` returned: wait for its exit records."""
    deadline = time.monotonic() + timeout
    while not all(plot.read_wandb_file(f).finished for f in plot.wandb_files(directory)):
        assert time.monotonic() < deadline, f"W&B run files under {directory} were never finished"
        time.sleep(0.05)


def run_with_log(ctx, argv: list[str], log_path: Path) -> tuple[dict, LogCapture]:
    capture = LogCapture(log_path)
    kotomamba_logger = logging.getLogger("kotomamba")
    level = kotomamba_logger.level
    kotomamba_logger.addHandler(capture)
    kotomamba_logger.setLevel(logging.INFO)  # rank 0's level (pretrain's setup_logging)
    try:
        result = run_configurations({"run": argv}, ctx)["run"]
    finally:
        kotomamba_logger.removeHandler(capture)
        kotomamba_logger.setLevel(level)
    return result, capture


@pytest.fixture(scope="module")
def observed(single_process, tiny_mamba1_config, sentencepiece_model, blend, tmp_path_factory) -> dict:
    """One run with every sink and every metric on; evaluation slowed down on purpose."""
    import kotomamba.train

    tmp = tmp_path_factory.mktemp("observed")
    argv = training_argv(tiny_mamba1_config, sentencepiece_model, blend) + [
        "--eval-interval", str(EVAL_INTERVAL), "--eval-iters", "2", "--optimizer-stats-interval", "2",
        "--peak-tflops", str(PEAK_TFLOPS), "--wandb-project", "kotomamba-tests", "--wandb-name", "observed",
        "--save", str(tmp / "save"), "--tensorboard-dir", str(tmp / "tb"),
    ]
    slow_evaluate = kotomamba.train.evaluate

    def evaluate(*args, **kwargs):
        time.sleep(EVAL_SLEEP)
        return slow_evaluate(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        patch.delenv("WANDB_DIR", raising=False)
        patch.setattr(kotomamba.train, "evaluate", evaluate)
        result, capture = run_with_log(single_process, argv, tmp / "train.log")
    assert "error" not in result, result
    wait_for_wandb_files(tmp / "save" / "wandb")
    return {
        "argv": argv, "result": result, "lines": capture.lines, "line_times": capture.times, "save": tmp / "save",
        "tensorboard": plot.read_tensorboard(tmp / "tb"), "wandb": plot.read_wandb(tmp / "save" / "wandb"),
        "log": plot.read_log(tmp / "train.log"),
        "reference": plain_training(argv, stats_at=(2, 4)),
    }


def expected_lr(iteration: int) -> float:
    """Warmup over 1 step from 0, then cosine to 0 over the remaining 3 (decay iters = train iters)."""
    completed = iteration - 1
    if completed <= 1:
        return MAX_LR * completed
    return MAX_LR * 0.5 * (1 + math.cos(math.pi * (completed - 1) / (ITERATIONS - 1)))


def test_every_sink_gets_the_same_metrics(observed):
    tensorboard, wandb = observed["tensorboard"], observed["wandb"]
    assert set(tensorboard) == set(wandb)
    for name, values in tensorboard.items():
        assert values.keys() == wandb[name].keys(), name
        for step, value in values.items():
            assert value == pytest.approx(wandb[name][step], rel=1e-6, nan_ok=True), (name, step)
    # The log line carries the main figures at their printed precision.
    for name in ("train/loss", "train/lr", "train/grad_norm", "throughput/tokens_per_s", "valid/loss", "test/loss"):
        assert observed["log"][name].keys() == tensorboard[name].keys(), name
        for step, value in observed["log"][name].items():
            printed_precision = 0.5 if name == "throughput/tokens_per_s" else 1e-3
            assert value == pytest.approx(tensorboard[name][step], rel=2e-3, abs=printed_precision), (name, step)


def test_the_save_directory_gets_the_metrics_as_json_lines_and_a_loss_curve_picture(observed):
    jsonl = plot.read_run(observed["save"] / "metrics.jsonl")
    tensorboard = observed["tensorboard"]
    assert set(jsonl) == set(tensorboard)
    for name, values in tensorboard.items():
        assert jsonl[name] == pytest.approx(values, rel=1e-6), name  # TensorBoard stores float32
    picture = observed["save"] / "loss_curves.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    assert not list(observed["save"].glob(".loss_curves*"))


def test_each_dataset_of_the_blend_reports_its_consumed_tokens_and_epochs(observed, blend):
    wandb = observed["wandb"]
    names = [Path(prefix).name for prefix in blend[1::2]]
    for step, consumed in wandb["progress/consumed_tokens"].items():
        assert sum(wandb[f"data/{name}/consumed_tokens"][step] for name in names) == consumed
        for name in names:
            assert 0 < wandb[f"data/{name}/epochs"][step] < 1
    last = [line for line in observed["lines"] if "data consumed:" in line]
    assert len(last) == 1 and f"iteration {ITERATIONS}: data consumed: {names[0]} " in last[0]


def test_run_files_that_cannot_be_written_only_warn(tmp_path, caplog):
    from kotomamba.sinks import RunFilesSink

    (tmp_path / "metrics.jsonl").mkdir()  # opening it for appending fails
    sink = RunFilesSink(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="kotomamba"):
        sink.log(1, {"train/loss": 2.0})
        sink.log(2, {"valid/loss": 2.0})
        sink.close(failed=False)
    warnings = [r for r in caplog.records if "could not write" in r.getMessage()]
    assert len(warnings) == 1 and "metrics.jsonl" in warnings[0].getMessage()


def test_one_log_line_per_interval(observed):
    training_lines = [line for line in observed["lines"] if f"/{ITERATIONS} | consumed tokens" in line]
    assert [line.split("iteration ")[1].split("/")[0] for line in training_lines] == ["2", "4"]
    # CPU: no GPU-only fields, rather than "n/a"
    assert all("peak memory" not in line and "n/a" not in line for line in training_lines)


def test_training_metrics_equal_independent_computations(observed):
    logged, reference = observed["tensorboard"], observed["reference"]
    tokens_per_iteration = GLOBAL_BATCH * SEQ_LENGTH
    flops = flops_per_token(load_model_config(observed["argv"][1], 450), SEQ_LENGTH)
    for step in (2, 4):
        interval = (step - 1, step)
        assert logged["train/lr"][step] == pytest.approx(expected_lr(step), rel=1e-6, abs=1e-12)
        assert logged["train/lr"][step] == pytest.approx(reference["lr"][step], rel=1e-6)
        mean_loss = sum(reference["loss"][i] for i in interval) / 2
        assert logged["train/loss"][step] == pytest.approx(mean_loss, rel=1e-5)
        assert logged["train/perplexity"][step] == pytest.approx(math.exp(mean_loss), rel=1e-5)
        assert logged["train/grad_norm"][step] == pytest.approx(reference["grad_norm"][step], rel=1e-4)
        assert logged["train/loss_scale"][step] == 1.0
        assert logged["train/skipped_steps"][step] == 0 and logged["train/skipped_steps_total"][step] == 0
        assert logged["progress/consumed_tokens"][step] == step * tokens_per_iteration
        assert logged["progress/consumed_samples"][step] == step * GLOBAL_BATCH
        # Throughput identities over the interval: 2 iterations of 128 tokens, one process.
        tokens_per_s = logged["throughput/tokens_per_s"][step]
        assert tokens_per_s * logged["time/iteration_s"][step] == pytest.approx(tokens_per_iteration, rel=1e-5)
        assert logged["throughput/tokens_per_s_per_gpu"][step] == pytest.approx(tokens_per_s, rel=1e-6)
        assert logged["throughput/tflops_per_gpu"][step] == pytest.approx(tokens_per_s * flops / 1e12, rel=1e-5)
        assert logged["throughput/mfu"][step] == pytest.approx(
            logged["throughput/tflops_per_gpu"][step] / PEAK_TFLOPS, rel=1e-5)
        assert 0 <= logged["time/data_wait_fraction"][step] < 1
    assert not any(name.startswith("memory/") for name in logged)  # n/a on CPU
    # Evaluation (slowed by EVAL_SLEEP) is not training time: the interval 3-4 measures the time between
    # the lines of iterations 2 and 4 less the evaluation at iteration 2 (whatever the machine's load).
    line_time = {line.split(" |")[0]: t for line, t in observed["line_times"].items()}
    between_lines = line_time[f"iteration 4/{ITERATIONS}"] - line_time[f"iteration 2/{ITERATIONS}"]
    assert 2 * logged["time/iteration_s"][4] < between_lines - EVAL_SLEEP


def test_validation_and_test_loss_per_blend_component(observed):
    logged, reference = observed["tensorboard"], observed["reference"]
    names = {0: "corpus_text_document", 1: "extra_text_document"}
    for split, steps, expected in (("valid", (2, 4), reference["valid"]), ("test", (4,), {4: reference["test"]})):
        for step in steps:
            assert logged[f"{split}/loss"][step] == pytest.approx(expected[step]["loss"], rel=1e-5)
            assert logged[f"{split}/perplexity"][step] == pytest.approx(math.exp(expected[step]["loss"]), rel=1e-5)
            assert set(expected[step]["components"]) == {0, 1}  # the data really mixes both
            for dataset_id, loss in expected[step]["components"].items():
                assert logged[f"{split}/{names[dataset_id]}/loss"][step] == pytest.approx(loss, rel=1e-5)
                assert logged[f"{split}/{names[dataset_id]}/perplexity"][step] == pytest.approx(math.exp(loss), rel=1e-5)
    assert set(logged["test/loss"]) == {ITERATIONS}


def test_optimizer_stats_equal_an_unsharded_computation(observed):
    logged, reference = observed["tensorboard"], observed["reference"]["stats"]
    for step in (2, 4):
        at_step = {name: values[step] for name, values in logged.items() if name.startswith("optimizer/")}
        assert set(at_step) == set(reference[step])
        for name, value in reference[step].items():
            assert at_step[name] == pytest.approx(value, rel=1e-4, abs=1e-9), (step, name)
    assert set(logged["optimizer/all/grad/l2"]) == {2, 4}
    # The gradients were still there (stats run before zero_grad) and clipped to --grad-clip-norm 1.
    assert 0 < logged["optimizer/all/grad/l2"][2] <= 1.0 + 1e-5


def test_wandb_run_has_the_config_and_the_stored_id(observed):
    save = observed["save"]
    run_id = (save / WANDB_RUN_ID_FILE).read_text().strip()
    files = plot.wandb_files(save / "wandb")
    assert len(files) == 1 and files[0].name == f"run-{run_id}.wandb"
    config = plot.read_wandb_file(files[0]).config
    assert config["optimizer"]["lr"] == MAX_LR and config["batch"]["train_iters"] == ITERATIONS
    assert config["batch"]["global_batch_size"] == GLOBAL_BATCH


def test_blend_components_are_named_by_their_prefixes_file_names():
    def blend(*prefixes: str) -> Namespace:
        return Namespace(datasets=[Namespace(indexed_dataset=Namespace(path_prefix=p)) for p in prefixes])

    assert metrics.blend_component_names(blend("/data/ja_wiki_text_document", "/data/en_text_document")) == {
        0: "ja_wiki_text_document", 1: "en_text_document"}
    assert metrics.blend_component_names(blend("/a/corpus", "/b/corpus")) == {0: "0-corpus", 1: "1-corpus"}
    assert metrics.blend_component_names(Namespace()) == {}  # a single dataset: no components
    values = metrics.evaluation_metrics("valid", {"loss": 2.0, "loss/dataset1": 3.0}, {1: "en"})
    assert values == {"valid/loss": 2.0, "valid/perplexity": math.exp(2.0), "valid/en/loss": 3.0,
                      "valid/en/perplexity": math.exp(3.0)}
    assert metrics.perplexity(1000.0) == math.inf and math.isnan(metrics.perplexity(math.nan))


def metric_logger_flags(tensorboard: Path, **changes) -> LoggingSection:
    flags = dict(eval_interval=100, eval_iters=0, log_interval=1, wandb_entity=None, wandb_project="kotomamba-tests",
                 wandb_name="resumed", tensorboard_dir=str(tensorboard), optimizer_stats_interval=0, skip_batch=None,
                 log_loss_per_dataset=False,
                 max_consecutive_skips=10)
    return LoggingSection(**{**flags, **changes})


def test_a_resumed_run_continues_the_same_wandb_run_and_tensorboard_curve(single_process, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    flags, save = metric_logger_flags(tmp_path / "tb"), str(tmp_path / "save")
    # First run: checkpoint at iteration 2, logs up to 3, then dies.
    with pytest.raises(KeyboardInterrupt), MetricLogger(flags, save, single_process) as first:
        first.start(0, {"train_iters": 4})
        for step in (1, 2, 3):
            first.log(step, {"train/loss": 10.0 - step})
        raise KeyboardInterrupt
    # Resumed from the checkpoint at iteration 2: iteration 3 again (another value), then 4.
    with MetricLogger(flags, save, single_process) as second:
        second.start(2, {"train_iters": 4})
        for step in (3, 4):
            second.log(step, {"train/loss": 20.0 - step})
    wait_for_wandb_files(tmp_path / "save" / "wandb")
    files = plot.wandb_files(tmp_path / "save" / "wandb")
    run_id = (tmp_path / "save" / WANDB_RUN_ID_FILE).read_text().strip()
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    assert plot.read_wandb(tmp_path / "save" / "wandb")["train/loss"].keys() == {1, 2, 3, 4}
    # TensorBoard drops what the first run logged after its checkpoint.
    assert plot.read_tensorboard(tmp_path / "tb")["train/loss"] == {1: 9.0, 2: 8.0, 3: 17.0, 4: 16.0}


def test_wandb_flags_without_a_project_or_package_are_named(single_process, tmp_path, monkeypatch):
    with pytest.raises(MetricsSinkError, match="--wandb-name resumed given without --wandb-project"):
        MetricLogger(metric_logger_flags(tmp_path, wandb_project=None), str(tmp_path), single_process)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(MetricsSinkError, match="--wandb-project kotomamba-tests needs the wandb package"):
        MetricLogger(metric_logger_flags(tmp_path), str(tmp_path), single_process)


# ------------------------------------------------------------------------------------------------
# Loss spikes


@pytest.fixture(scope="module")
def stability_runs(single_process, tiny_mamba1_config, sentencepiece_model, tokenized_corpus, tmp_path_factory) -> dict:
    """Iteration 2's loss made NaN once (a spike); the same run with --skip-batch 2 2; a loss that stays
    NaN from iteration 2 on (stuck), which must stop after --max-consecutive-skips; and --skip-batch 2 2
    given to a run resumed from a checkpoint at iteration 1 (with W&B and TensorBoard)."""
    import kotomamba.loss

    tmp = tmp_path_factory.mktemp("stability")
    argv = training_argv(tiny_mamba1_config, sentencepiece_model, [str(tokenized_corpus)]) + [
        "--eval-iters", "0", "--log-interval", "4"]
    resumable = ["--save", str(tmp / "save"), "--log-interval", "1", "--wandb-project", "kotomamba-tests",
                 "--tensorboard-dir", str(tmp / "resumed")]
    plan = (  # name, extra flags, the loss-function calls (2 per iteration) whose loss is NaN
        ("spike", ["--tensorboard-dir", str(tmp / "spike")], range(3, 4)),
        ("skip_batch", ["--skip-batch", "2", "2"], range(0)),
        ("stuck", ["--tensorboard-dir", str(tmp / "stuck"), "--max-consecutive-skips", "2"], range(3, 10**9)),
        ("before_resume", resumable + ["--exit-interval", "1"], range(0)),
        ("resumed", resumable + ["--load", str(tmp / "save"), "--skip-batch", "2", "2"], range(0)),
    )
    loss_function = kotomamba.loss.language_model_loss
    calls = {"count": 0, "poisoned": range(0)}

    def spiking_loss(logits, labels, reduction="mean"):
        if reduction != "mean":  # evaluation
            return loss_function(logits, labels, reduction)
        calls["count"] += 1
        loss = loss_function(logits, labels)
        return loss + float("nan") if calls["count"] in calls["poisoned"] else loss

    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kotomamba.loss, "language_model_loss", spiking_loss)
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        patch.delenv("WANDB_DIR", raising=False)
        for name, extra, poisoned in plan:
            calls.update(count=0, poisoned=poisoned)
            runs[name], capture = run_with_log(single_process, argv + extra, tmp / f"{name}.log")
            runs[name]["lines"] = capture.lines
    wait_for_wandb_files(tmp / "save" / "wandb")
    for name in ("spike", "stuck", "resumed"):
        runs[name]["tensorboard"] = plot.read_tensorboard(tmp / name)
    runs["resumed"]["wandb_files"] = plot.wandb_files(tmp / "save" / "wandb")
    runs["resumed"]["wandb"] = plot.read_wandb(tmp / "save" / "wandb")
    return runs


def test_a_non_finite_step_is_skipped_counted_and_leaves_no_trace(stability_runs):
    spike, skip_batch = stability_runs["spike"], stability_runs["skip_batch"]
    assert spike["skipped"] == [False, True, False, False]
    assert math.isnan(spike["loss"][1])
    # The optimizer did not step at iteration 2: the weights (and Adam state) are those of --skip-batch 2 2.
    assert spike["loss"][2:] == skip_batch["loss"][2:]
    logged = spike["tensorboard"]
    assert logged["train/skipped_steps"] == {4: 1} and logged["train/skipped_steps_total"] == {4: 1}
    # The interval's loss leaves the NaN out.
    finite = [spike["loss"][i] for i in (0, 2, 3)]
    assert logged["train/loss"][4] == pytest.approx(sum(finite) / 3, rel=1e-6)
    assert any("iteration 2: non-finite loss or gradients" in line for line in spike["lines"])
    training_lines = [line for line in spike["lines"] if "consumed tokens" in line]
    assert training_lines and all("MFU" not in line for line in training_lines)  # CPU without --peak-tflops
    assert "throughput/mfu" not in logged


def test_consecutive_non_finite_steps_stop_the_run_after_logging_them(stability_runs):
    stuck = stability_runs["stuck"]
    assert "2 consecutive iterations had non-finite loss or gradients" in stuck["error"]
    assert "--max-consecutive-skips 2" in stuck["error"] and "stopping at iteration 3" in stuck["error"]
    # The sinks saw the skips before the run stopped, though iteration 3 is not a --log-interval multiple.
    logged = stuck["tensorboard"]
    assert logged["train/skipped_steps"] == {3: 2} and logged["train/skipped_steps_total"] == {3: 2}


def test_skip_batch_counts_absolute_iterations_after_a_resume(stability_runs):
    before, resumed, straight = (stability_runs[n] for n in ("before_resume", "resumed", "skip_batch"))
    assert before["iteration"] == [1] and resumed["iteration"] == [2, 3, 4]
    assert resumed["skipped"][0] and resumed["loss"][0] is None  # iteration 2, as in the straight run
    assert resumed["loss"][1:] == pytest.approx(straight["loss"][2:], rel=1e-6)
    assert resumed["consumed_samples"] == straight["consumed_samples"] == ITERATIONS * GLOBAL_BATCH
    # The resumed run continues the same W&B run and TensorBoard curve; iteration 2 trained nothing, so
    # the line at 3 covers iterations 2-3 and counts the skipped batch.
    files = resumed["wandb_files"]
    assert len(files) == 2 and files[0].name == files[1].name
    for logged in (resumed["wandb"], resumed["tensorboard"]):
        assert logged["train/loss"].keys() == {1, 3, 4}
        assert logged["train/skipped_batches"] == {1: 0, 3: 1, 4: 0}
        assert logged["progress/consumed_samples"] == {1: 4, 3: 12, 4: 16}



def test_a_wandb_flag_error_is_a_user_error(single_process, tiny_mamba1_config, sentencepiece_model, tokenized_corpus):
    """Raised on every rank before the model is built, and a KotomambaError (one line, no traceback)."""
    argv = training_argv(tiny_mamba1_config, sentencepiece_model, [str(tokenized_corpus)]) + ["--wandb-entity", "team"]
    result = run_configurations({"run": argv}, single_process)["run"]
    assert result["error"].startswith("--wandb-entity team given without --wandb-project")


def test_remaining_time_follows_the_recent_pace_not_the_slow_first_interval():
    from kotomamba.metrics import RemainingTime

    estimate = RemainingTime(start_iteration=0, started=0.0, window=3)
    # iterations 1-10 take 50 s (compilation), every later one 1 s; 150 iterations in all
    assert estimate.update(10, 50.0, 150) == pytest.approx(5.0 * 140)  # only the first interval is known
    assert estimate.update(20, 60.0, 150) == pytest.approx(1.0 * 130)  # the first interval is dropped
    assert estimate.update(30, 70.0, 150) == pytest.approx(120.0)
    for iteration in (40, 50, 60):
        remaining = estimate.update(iteration, 70.0 + (iteration - 30) * 2.0, 150)  # the pace halves
    assert remaining == pytest.approx(2.0 * 90)  # the last 3 intervals only


def test_training_loss_per_dataset_is_each_datasets_mean_over_the_interval(single_process, tiny_mamba1_config,
                                                                          sentencepiece_model, blend, tmp_path):
    """--log-loss-per-dataset: the first iteration's loss of each dataset of the blend equals the mean
    loss of that dataset's samples in the first global batch, computed by hand from the same model."""
    import torch.nn.functional as F

    from kotomamba.config import parse_run_config
    from kotomamba.model import build_model
    from kotomamba.train import build_datasets
    from megatron_lm.tokenizer import build_tokenizer

    argv = training_argv(tiny_mamba1_config, sentencepiece_model, blend) + [
        "--log-interval", "1", "--log-loss-per-dataset", "--save", str(tmp_path / "save")]
    result = run_configurations({"run": argv}, single_process)["run"]
    assert "error" not in result, result
    logged = plot.read_run(tmp_path / "save" / "metrics.jsonl")

    config = parse_run_config(argv, 1)
    tokenizer = build_tokenizer(config.tokenizer.tokenizer_type, config.tokenizer.tokenizer_model)
    model = build_model(load_model_config(config.model.model, tokenizer.vocab_size), seed=config.data.seed)
    train, _, _ = build_datasets(config)
    names = metrics.blend_component_names(train)
    sums: dict[int, list[float]] = {}
    with torch.no_grad():
        for k in range(GLOBAL_BATCH):
            sample = train[k]
            logits = model(torch.as_tensor(sample["tokens"]).long()[None]).logits[0]
            loss = F.cross_entropy(logits, torch.as_tensor(sample["labels"]).long(), reduction="sum")
            sums.setdefault(sample["dataset_id"], []).append(float(loss))
    assert len(sums) == 2, "the first global batch should hold samples of both datasets"
    for dataset_id, losses in sums.items():
        expected = sum(losses) / (len(losses) * SEQ_LENGTH)
        assert logged[f"train/{names[dataset_id]}/loss"][1] == pytest.approx(expected, rel=1e-5)
    assert "train/loss" in logged and logged["train/loss"][1] == pytest.approx(
        sum(sum(losses) for losses in sums.values()) / (GLOBAL_BATCH * SEQ_LENGTH), rel=1e-5)
