"""Tests for kotomamba.precision: presets, FSDP2 policies, autocast and loss scaling."""
from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kotomamba.precision import (
    DynamicLossScaler,
    NoLossScaler,
    PrecisionConfigError,
    autocast_context,
    build_loss_scaler,
    resolve_precision,
)


@pytest.mark.parametrize(
    "preset, param, reduce, compute, scaling",
    [
        ("bf16", torch.bfloat16, torch.float32, torch.bfloat16, False),
        ("fp16", torch.float32, torch.float16, torch.float16, True),
        ("fp32", torch.float32, torch.float32, torch.float32, False),
    ],
)
def test_presets(preset, param, reduce, compute, scaling):
    policy = resolve_precision(preset)
    assert (policy.param_dtype, policy.reduce_dtype, policy.compute_dtype) == (param, reduce, compute)
    assert policy.use_loss_scaling is scaling
    assert isinstance(build_loss_scaler(policy, "cpu"), DynamicLossScaler if scaling else NoLossScaler)


def test_auto_is_fp32_on_cpu():
    policy = resolve_precision("auto", device_type="cpu")
    assert policy.name == "fp32" and policy.param_dtype == torch.float32 and not policy.use_loss_scaling


def test_overrides_and_their_effects():
    policy = resolve_precision("bf16", param_dtype="fp32", reduce_dtype="bfloat16")
    assert policy.param_dtype == torch.float32 and policy.reduce_dtype == torch.bfloat16
    assert policy.uses_autocast  # fp32 parameters, bf16 compute
    policy = resolve_precision("fp16", param_dtype=torch.float16, reduce_dtype="fp32")
    assert not policy.uses_autocast and policy.use_loss_scaling
    assert resolve_precision("fp32", reduce_dtype="fp16").use_loss_scaling


@pytest.mark.parametrize(
    "args, flag",
    [
        (("int8",), "--precision"),
        (("bf16", "half"), "--param-dtype"),
        (("bf16", None, "fp64"), "--reduce-dtype"),
        (("bf16", "fp16"), "--param-dtype"),  # fp16 parameters cannot feed bf16 compute
    ],
)
def test_bad_precision_flags_name_the_flag(args, flag):
    with pytest.raises(PrecisionConfigError, match=flag):
        resolve_precision(*args)


def test_autocast_context_casts_matmuls_only_when_needed():
    weight, inputs = torch.randn(4, 4), torch.randn(2, 4)
    with autocast_context(resolve_precision("fp16"), "cpu"):
        assert (inputs @ weight).dtype == torch.float16
    with autocast_context(resolve_precision("bf16", param_dtype="fp32"), "cpu"):
        assert (inputs @ weight).dtype == torch.bfloat16
    with autocast_context(resolve_precision("bf16"), "cpu"):
        assert (inputs @ weight).dtype == torch.float32  # parameters already bf16: no autocast


def _parameter_with_grad(values: list[float]) -> nn.Parameter:
    parameter = nn.Parameter(torch.zeros(len(values)))
    parameter.grad = torch.tensor(values)
    return parameter


def test_loss_scaler_growth_after_interval():
    scaler = DynamicLossScaler(initial_scale=8.0, growth_interval=3, hysteresis=2)
    assert scaler.scale_loss(torch.tensor(1.5)).item() == 12.0
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 8.0
    scaler.update(False)
    assert scaler.scale == 16.0
    scaler.update(True)  # an overflow restarts the growth count
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 16.0
    scaler.update(False)
    assert scaler.scale == 32.0


def test_loss_scaler_backoff_with_hysteresis_and_min_scale():
    scaler = DynamicLossScaler(initial_scale=16.0, min_scale=2.0, growth_interval=2, hysteresis=2)
    scaler.update(True)
    assert scaler.scale == 16.0  # first overflow only uses up hysteresis
    scaler.update(True)
    assert scaler.scale == 8.0
    scaler.update(True)  # hysteresis stays used up until the next growth (Megatron)
    assert scaler.scale == 4.0
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 2.0  # clamped at min_scale
    scaler.update(False)
    scaler.update(False)  # growth refills hysteresis
    assert scaler.scale == 4.0
    scaler.update(True)
    assert scaler.scale == 4.0


def megatron_scales(overflows: list[bool], initial: float, min_scale: float, growth: float, backoff: float,
                    growth_interval: int, hysteresis: int) -> list[float]:
    """Megatron's DynamicGradScaler.update, written out on the host: the scale after each step."""
    scale, growth_tracker, hysteresis_tracker, scales = initial, 0, hysteresis, []
    for found_inf in overflows:
        if found_inf:
            growth_tracker = 0
            hysteresis_tracker -= 1
            if hysteresis_tracker <= 0:
                scale = max(scale * backoff, min_scale)
        else:
            growth_tracker += 1
            if growth_tracker == growth_interval:
                growth_tracker = 0
                hysteresis_tracker = hysteresis
                scale = scale * growth
        scales.append(scale)
    return scales


@pytest.mark.parametrize("seed", range(4))
def test_loss_scaler_on_the_device_decides_exactly_as_the_host_algorithm(seed):
    """Random runs of overflows, given as device tensors (as the training step gives them), with factors
    that are not powers of two: every scale equals the host algorithm's float, bit for bit."""
    generator = torch.Generator().manual_seed(seed)
    overflows = (torch.rand(300, generator=generator) < [0.1, 0.3, 0.6, 0.9][seed]).tolist()
    options = dict(initial=1000.0, min_scale=0.7, growth=3.0, backoff=0.3, growth_interval=1 + seed, hysteresis=2 + seed % 2)
    scaler = DynamicLossScaler(initial_scale=options["initial"], min_scale=options["min_scale"],
                               growth_factor=options["growth"], backoff_factor=options["backoff"],
                               growth_interval=options["growth_interval"], hysteresis=options["hysteresis"])
    scales = []
    for overflow in overflows:
        scaler.update(torch.tensor(overflow))
        scales.append(scaler.scale)
    assert scales == megatron_scales(overflows, **options)
    assert len(set(scales)) > 3  # it grew and backed off
    # The multiply rounds the scale as a Python float would be rounded.
    loss = torch.tensor(1.2345678)
    assert torch.equal(scaler.scale_loss(loss), loss * scales[-1])


def test_loss_scaler_unscales_every_gradient():
    scaler = DynamicLossScaler(initial_scale=4.0)
    parameters = [_parameter_with_grad([4.0, -8.0]), _parameter_with_grad([2.0]),
                  nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    parameters[2].grad = torch.tensor([8.0, 12.0], dtype=torch.float64)  # another dtype: another fused group
    scaler.unscale_(parameters)
    assert parameters[0].grad.tolist() == [1.0, -2.0] and parameters[1].grad.tolist() == [0.5]
    assert parameters[2].grad.tolist() == [2.0, 3.0]


def test_loss_scaler_state_dict_round_trip_and_megatron_tensor_scale():
    scaler = DynamicLossScaler(initial_scale=64.0, growth_interval=5, hysteresis=3)
    scaler.update(True)
    scaler.update(True)
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == {"scale": 64.0, "growth_tracker": 0, "hysteresis_tracker": 1}
    restored.update(True)
    assert restored.scale == 32.0
    restored.load_state_dict({"scale": torch.tensor([1024.0]), "growth_tracker": 2, "hysteresis_tracker": 2})
    assert restored.scale == 1024.0


@pytest.mark.parametrize(
    "kwargs", [{"min_scale": 0.0}, {"growth_factor": 1.0}, {"backoff_factor": 1.5}, {"hysteresis": 0}]
)
def test_loss_scaler_rejects_bad_settings(kwargs):
    with pytest.raises(PrecisionConfigError):
        DynamicLossScaler(**kwargs)


def test_no_loss_scaler_leaves_gradients_alone():
    scaler = NoLossScaler()
    loss = torch.tensor(2.5)
    assert scaler.scale_loss(loss) is loss and scaler.scale == 1.0
    parameters = [_parameter_with_grad([3.0]), _parameter_with_grad([float("nan")])]
    scaler.unscale_(parameters)
    assert parameters[0].grad.tolist() == [3.0]


def _overflow_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (as DataLoader workers)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    from torch.distributed.fsdp import fully_shard

    from kotomamba.optim import clip_grad_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    fully_shard(model)
    model(torch.randn(3, 4)).sum().mul(8.0).backward()
    full_before = [p.grad.full_tensor().clone() for p in model.parameters()]

    scaler = DynamicLossScaler(initial_scale=8.0)
    scaler.unscale_(model.parameters())
    full_after = [p.grad.full_tensor() for p in model.parameters()]
    unscaled = all(torch.allclose(a, b / 8.0) for a, b in zip(full_after, full_before))
    clean_norm = float(clip_grad_norm(model.parameters(), max_norm=None))

    norms = {}
    for bad in ("inf", "nan"):
        if rank == 1:  # only this rank's shard overflows
            next(model.parameters()).grad.to_local()[0].fill_(float(bad))
        norms[bad] = float(clip_grad_norm(model.parameters(), max_norm=1.0))
    torch.save({"unscaled": unscaled, "clean_norm": clean_norm, "norms": norms}, f"{result_file}.{rank}")
    dist.destroy_process_group()


def test_an_overflow_on_one_rank_makes_every_rank_skip(tmp_path):
    """Sharded gradients are unscaled on each rank's shard; an inf or nan in one rank's shard makes the
    global gradient norm, which the loop's skip decision reads, non-finite on every rank."""
    result_file = str(tmp_path / "result.pt")
    # fork, not spawn: children inherit the imported modules (1 s instead of ~10 s of imports).
    mp.start_processes(
        _overflow_worker, args=(2, str(tmp_path / "init"), result_file), nprocs=2, start_method="fork"
    )
    for rank in range(2):
        result = torch.load(f"{result_file}.{rank}")
        assert result["unscaled"], rank
        assert math.isfinite(result["clean_norm"]) and result["clean_norm"] > 0, rank
        assert math.isinf(result["norms"]["inf"]), rank
        assert math.isnan(result["norms"]["nan"]), rank
