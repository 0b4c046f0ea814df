"""kotomamba.optimizer_stats: per-group L1/L2/abs-max of weights, gradients and Adam moments equal the
figures of whole, unsharded tensors; on one process, and under torchrun across FSDP shards (padded,
replicated over a mesh dimension, or FSDP-ignored fp32 replicas), in a real 2-process training run too."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kotomamba import plot
from kotomamba.optimizer_stats import QUANTITIES, STATISTICS, OptimizerStats, stat_groups

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_model_config  # noqa: E402
from reference_training import grouped_stats, model_stats, plain_training  # noqa: E402
from launching import run_worker, torchrun_command  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "optimizer_stats_worker.py"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tests (gloo)")

# Odd sizes (d_model 33: norms, out_proj; x_proj 19 rows; vocabulary 101) so FSDP pads shards over 2 ranks.
ODD_MODEL = {
    "d_model": 33, "n_layer": 2, "d_intermediate": 0,
    "ssm_cfg": {"layer": "Mamba1", "d_state": 8, "d_conv": 4, "expand": 2},
    "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
    "pad_vocab_size_multiple": 1, "tie_embeddings": False,
}
ODD_VOCAB = 101


def test_group_names():
    assert stat_groups("backbone.embedding.weight") == ("all", "embedding")
    assert stat_groups("backbone.layers.11.mixer.A_log") == ("all", "layers.11", "layers.*.mixer.A_log")
    assert stat_groups("backbone.norm_f.weight") == ("all", "norm_f")
    assert stat_groups("lm_head.weight") == ("all", "lm_head")


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 7)
        self.second = nn.Linear(7, 3, bias=False)


def test_plain_model_stats_equal_whole_tensor_figures(single_process):
    torch.manual_seed(0)
    model = TwoLayers()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    stats = OptimizerStats(model, optimizer, single_process.device)
    model.second(model.first(torch.randn(4, 5))).pow(2).sum().backward()
    before_any_step = stats.compute()  # no Adam state yet: zeros, no error
    assert before_any_step["optimizer/all/exp_avg/l2"] == 0.0
    assert before_any_step["optimizer/all/grad/l2"] > 0
    optimizer.step()
    values = stats.compute()
    expected = model_stats(model, optimizer)
    assert set(values) == set(expected)
    assert {"optimizer/first/weight/l1", "optimizer/second/exp_avg_sq_sqrt/abs_max"} <= set(values)
    assert len(values) == 3 * len(QUANTITIES) * len(STATISTICS)  # groups all, first, second
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, rel=1e-6), name
    direct = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    assert values["optimizer/all/grad/l1"] == pytest.approx(direct.abs().sum().item(), rel=1e-6)
    assert values["optimizer/all/grad/l2"] == pytest.approx(direct.norm().item(), rel=1e-6)


def test_reference_grouping_matches_the_documented_groups():
    tensors = {"backbone.layers.0.mixer.D": {"weight": torch.tensor([3.0, -4.0])},
               "backbone.layers.1.mixer.D": {"weight": torch.tensor([-12.0])}}
    stats = grouped_stats(tensors)
    assert stats["optimizer/all/weight/l2"] == pytest.approx(13.0)
    assert stats["optimizer/layers.*.mixer.D/weight/l1"] == pytest.approx(19.0)
    assert stats["optimizer/layers.0/weight/abs_max"] == pytest.approx(4.0)


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory, tiny_mamba1_config, sentencepiece_model, tokenized_corpus) -> dict:
    """One 2-process launch: the sharded cases, and a short training run with optimizer stats on."""
    tmp = tmp_path_factory.mktemp("optimizer_stats")
    training_argv = [
        "--model", str(tiny_mamba1_config), "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", str(sentencepiece_model), "--data-path", str(tokenized_corpus), "--split", "90,10,0",
        "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "4",
        "--lr", "2e-3", "--lr-warmup-iters", "1", "--eval-iters", "0", "--num-workers", "0", "--seed", "7", "--fp32",
        "--log-interval", "2", "--optimizer-stats-interval", "2", "--tensorboard-dir", str(tmp / "tb"),
    ]
    spec = {"model_config": str(write_model_config(tmp / "odd.json", ODD_MODEL)), "vocab_size": ODD_VOCAB,
            "training": {"fsdp": training_argv}}
    results = run_worker(torchrun_command(2), spec, tmp, worker=WORKER, name="spec")
    results["training_argv"] = training_argv
    results["tensorboard"] = plot.read_tensorboard(tmp / "tb")
    results["tensorboard_files"] = list((tmp / "tb").glob("*tfevents*"))
    return results


@pytest.mark.parametrize("case", ["full_shard_bf16", "no_shard_fp32"])
def test_sharded_stats_equal_full_tensor_figures(torchrun_results, case):
    result = torchrun_results["sharded"][case]
    if case == "full_shard_bf16":
        assert result["padded"], "the odd model should give padded shards"
        assert result["replicated"] > 0, "bf16 parameters should leave A_log, D, dt_bias to plain fp32 replicas"
    stats, reference = result["stats"], result["reference"]
    assert set(stats) == set(reference)
    assert {"optimizer/lm_head/grad/l2", "optimizer/layers.*.mixer.A_log/exp_avg_sq_sqrt/l1"} <= set(stats)
    for name, value in reference.items():
        assert stats[name] == pytest.approx(value, rel=1e-5, abs=1e-12), (case, name)
    # Not vacuous: the gradients and moments are really there.
    assert all(stats[f"optimizer/all/{q}/l2"] > 0 for q in QUANTITIES)


def test_two_process_training_logs_the_stats_of_an_unsharded_run(torchrun_results):
    """The 2-process FSDP run's logged statistics equal a plain one-process loop's whole-tensor ones."""
    reference = plain_training(torchrun_results["training_argv"], stats_at=(2, 4))
    logged = torchrun_results["tensorboard"]
    for step in (2, 4):
        for name, value in reference["stats"][step].items():
            assert logged[name][step] == pytest.approx(value, rel=1e-4, abs=1e-9), (step, name)
        assert logged["train/grad_norm"][step] == pytest.approx(reference["grad_norm"][step], rel=1e-4)
    assert math.isfinite(logged["optimizer/all/exp_avg_sq_sqrt/l1"][4])
    assert len(torchrun_results["tensorboard_files"]) == 1  # only rank 0 writes
