"""Tests for kotomamba.optim: parameter groups, AdamW, the Megatron LR schedule, global grad clipping."""
from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kotomamba.lr_schedule import LRSchedule, OptimizerConfigError
from kotomamba.optim import (
    apply_lr,
    build_optimizer,
    clip_grad_norm,
    marked_no_weight_decay_names,
    normalize_parameter_name,
    parameter_groups,
)


class FakeMamba1Mixer(nn.Module):
    """Same parameter names and shapes as mamba_ssm.modules.mamba_simple.Mamba."""

    def __init__(self, d_model: int = 8, d_state: int = 4) -> None:
        super().__init__()
        d_inner = 2 * d_model
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, kernel_size=4, groups=d_inner)
        self.x_proj = nn.Linear(d_inner, 1 + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(1, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(d_inner, d_state))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)


class FakeMamba2Mixer(nn.Module):
    """Mamba2's SSM parameters (1-D A_log, dt_bias) plus a marked 2-D parameter with a free name."""

    def __init__(self, d_model: int = 8, nheads: int = 2) -> None:
        super().__init__()
        self.in_proj = nn.Linear(d_model, 4 * d_model, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(nheads))
        self.A_log = nn.Parameter(torch.zeros(nheads))
        self.D = nn.Parameter(torch.ones(nheads))
        self.init_states = nn.Parameter(torch.zeros(nheads, 3))
        self.init_states._no_weight_decay = True
        self.out_proj = nn.Linear(2 * d_model, d_model, bias=False)


class FakeBlock(nn.Module):
    def __init__(self, mixer: nn.Module, d_model: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixer = mixer


class FakeLM(nn.Module):
    """Embedding, blocks, final norm and an lm_head tied to the embedding, as MambaLMHeadModel."""

    def __init__(self, d_model: int = 8, vocab: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(
            [FakeBlock(FakeMamba1Mixer(d_model)), FakeBlock(FakeMamba2Mixer(d_model))]
        )
        self.norm_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self.lm_head.weight = self.embedding.weight


EXPECTED_DECAY = {
    "embedding.weight",
    "layers.0.mixer.in_proj.weight",
    "layers.0.mixer.conv1d.weight",
    "layers.0.mixer.x_proj.weight",
    "layers.0.mixer.dt_proj.weight",
    "layers.0.mixer.out_proj.weight",
    "layers.1.mixer.in_proj.weight",
    "layers.1.mixer.out_proj.weight",
}
EXPECTED_NO_DECAY = {
    "layers.0.norm.weight",
    "layers.0.norm.bias",
    "layers.0.mixer.conv1d.bias",
    "layers.0.mixer.dt_proj.bias",
    "layers.0.mixer.A_log",
    "layers.0.mixer.D",
    "layers.1.norm.weight",
    "layers.1.norm.bias",
    "layers.1.mixer.dt_bias",
    "layers.1.mixer.A_log",
    "layers.1.mixer.D",
    "layers.1.mixer.init_states",
    "norm_f.weight",
    "norm_f.bias",
}


def _groups_by_decay(groups: list[dict]) -> dict[float, set[str]]:
    merged: dict[float, set[str]] = {}
    for group in groups:
        merged.setdefault(group["weight_decay"], set()).update(group["param_names"])
    return merged


def test_parameter_groups_split_mamba_names():
    model = FakeLM()
    groups = _groups_by_decay(parameter_groups(model, weight_decay=0.1))
    assert groups[0.1] == EXPECTED_DECAY
    assert groups[0.0] == EXPECTED_NO_DECAY
    unique_parameters = {id(p) for p in model.parameters()}
    listed = [p for group in parameter_groups(model, 0.1) for p in group["params"]]
    assert len(listed) == len(unique_parameters) == len({id(p) for p in listed})
    assert all(p is not model.lm_head.weight or p is model.embedding.weight for p in listed)


def test_parameter_groups_extra_names_frozen_and_wrapper_prefixes():
    model = FakeLM()
    model.layers[0].mixer.x_proj.weight.requires_grad_(False)
    groups = _groups_by_decay(parameter_groups(model, 0.1, no_decay_names={"layers.1.mixer.in_proj.weight"}))
    assert "layers.0.mixer.x_proj.weight" not in groups[0.1] | groups[0.0]
    assert "layers.1.mixer.in_proj.weight" in groups[0.0]
    assert normalize_parameter_name(
        "layers.3._fsdp_wrapped_module._checkpoint_wrapped_module.mixer._orig_mod.A_log"
    ) == "layers.3.mixer.A_log"


def test_parameter_groups_on_checkpoint_wrapped_model():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = FakeLM()
    marked = marked_no_weight_decay_names(model)
    assert marked == {"layers.0.mixer.A_log", "layers.0.mixer.D", "layers.1.mixer.init_states"}
    model.layers[1] = checkpoint_wrapper(model.layers[1])
    assert any("_checkpoint_wrapped_module" in name for name, _ in model.named_parameters())
    groups = _groups_by_decay(parameter_groups(model, 0.1))
    assert groups[0.1] == EXPECTED_DECAY and groups[0.0] == EXPECTED_NO_DECAY


def test_parameter_groups_on_real_mamba_model():
    kernels = pytest.importorskip("kotomamba.kernels")
    kernels.select_kernel_backend("cpu")
    mixer_seq_simple = pytest.importorskip("mamba_ssm.models.mixer_seq_simple")
    from mamba_ssm.models.config_mamba import MambaConfig

    for ssm_cfg in ({"layer": "Mamba1"}, {"layer": "Mamba2", "d_state": 16, "headdim": 16}):
        config = MambaConfig(
            d_model=32, n_layer=2, vocab_size=100, ssm_cfg=ssm_cfg, d_intermediate=64,
            rms_norm=True, fused_add_norm=False, residual_in_fp32=True,
        )
        model = mixer_seq_simple.MambaLMHeadModel(config, device="meta")
        groups = _groups_by_decay(parameter_groups(model, 0.1))
        for name, parameter in model.named_parameters():
            expected_no_decay = (
                parameter.ndim == 1 or name.endswith((".A_log", ".D", ".dt_bias"))
            )
            assert (name in groups[0.0]) == expected_no_decay, name
            assert (name in groups[0.1]) != expected_no_decay, name
        assert "backbone.embedding.weight" in groups[0.1]
        assert "lm_head.weight" not in groups[0.1] | groups[0.0]  # tied: listed once, as the embedding


def test_build_optimizer_decays_only_the_decay_group():
    model = FakeLM()
    optimizer = build_optimizer(model, lr=0.5, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert not optimizer.defaults["fused"]  # parameters live on CPU
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam update is 0: only decoupled weight decay moves weights
    optimizer.step()
    for name, p in model.named_parameters():
        if name in EXPECTED_DECAY:
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.5 * 0.1))
        elif name in EXPECTED_NO_DECAY:
            torch.testing.assert_close(p.detach(), before[name])


def test_build_optimizer_rejects_bad_settings():
    with pytest.raises(OptimizerConfigError, match="--adam-beta2"):
        build_optimizer(FakeLM(), lr=1e-3, weight_decay=0.1, betas=(0.9, 1.5), eps=1e-8)


def test_lr_warmup_then_cosine():
    schedule = LRSchedule(max_lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, style="cosine")
    assert schedule.lr_at(0) == 0.0  # Megatron's first step uses the warmup start lr
    assert schedule.lr_at(5) == pytest.approx(0.5)
    assert schedule.lr_at(10) == pytest.approx(1.0)
    # iteration 60: ratio (60-10)/100 = 0.5 -> cos(pi/2)=0 -> coeff 0.5 -> 0.1 + 0.9*0.5
    assert schedule.lr_at(60) == pytest.approx(0.55)
    # iteration 35: ratio 0.25 -> coeff 0.5*(cos(pi/4)+1) = 0.853553...
    assert schedule.lr_at(35) == pytest.approx(0.1 + 0.9 * 0.8535533905932737)
    assert schedule.lr_at(110) == pytest.approx(0.1)
    assert schedule.lr_at(500) == 0.1


def test_lr_linear_constant_inverse_sqrt():
    linear = LRSchedule(max_lr=2.0, min_lr=0.0, warmup_iters=0, decay_iters=100, style="linear")
    assert linear.lr_at(0) == 2.0
    assert linear.lr_at(25) == pytest.approx(1.5)
    assert linear.lr_at(100) == pytest.approx(0.0)
    constant = LRSchedule(max_lr=3e-4, min_lr=1e-5, warmup_iters=4, decay_iters=8, style="constant")
    assert constant.lr_at(1) == pytest.approx(0.75e-4)
    assert constant.lr_at(9999) == 3e-4  # constant ignores decay_iters, like Megatron
    inverse = LRSchedule(
        max_lr=1.0, min_lr=0.1, warmup_iters=4, decay_iters=1000, style="inverse-square-root"
    )
    assert inverse.lr_at(16) == pytest.approx(0.5)  # sqrt(4/16)
    assert inverse.lr_at(900) == pytest.approx(0.1)  # sqrt(4/900)=0.067 clamps at min_lr
    warm_init = LRSchedule(max_lr=1.0, min_lr=0.0, warmup_iters=10, decay_iters=20, warmup_init_lr=0.2)
    assert warm_init.lr_at(5) == pytest.approx(0.6)


@pytest.mark.parametrize(
    "wsd_style, coeff_at_half",
    [("linear", 0.5), ("cosine", 0.5), ("exponential", 2 * 0.5**0.5 - 1), ("minus_sqrt", 1 - 0.5**0.5)],
)
def test_lr_wsd(wsd_style, coeff_at_half):
    schedule = LRSchedule(
        max_lr=1.0, min_lr=0.2, warmup_iters=10, decay_iters=100, style="wsd",
        wsd_decay_iters=20, wsd_decay_style=wsd_style,
    )
    assert schedule.style == "WSD"
    assert schedule.lr_at(10) == 1.0
    assert schedule.lr_at(80) == 1.0  # stable until decay_iters - wsd_decay_iters
    assert schedule.lr_at(90) == pytest.approx(0.2 + 0.8 * coeff_at_half)
    assert schedule.lr_at(100) == pytest.approx(0.2)
    assert schedule.lr_at(101) == 0.2


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"style": "step"}, "--lr-decay-style"),
        ({"min_lr": 2.0}, "--min-lr"),
        ({"warmup_iters": 200}, "--lr-warmup-iters"),
        ({"style": "WSD"}, "--lr-wsd-decay-iters"),
        ({"style": "WSD", "wsd_decay_iters": 5, "wsd_decay_style": "square"}, "--lr-wsd-decay-style"),
    ],
)
def test_lr_schedule_rejects_bad_settings(kwargs, flag):
    settings = {"max_lr": 1.0, "min_lr": 0.1, "warmup_iters": 10, "decay_iters": 100} | kwargs
    with pytest.raises(OptimizerConfigError, match=flag):
        LRSchedule(**settings)


def test_apply_lr_sets_every_group():
    optimizer = build_optimizer(FakeLM(), lr=1.0, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    apply_lr(optimizer, 0.25)
    assert len(optimizer.param_groups) == 2
    assert all(group["lr"] == 0.25 for group in optimizer.param_groups)


def _parameters_with_grads(*grads: torch.Tensor) -> list[nn.Parameter]:
    parameters = []
    for grad in grads:
        parameter = nn.Parameter(torch.zeros_like(grad))
        parameter.grad = grad.clone()
        parameters.append(parameter)
    return parameters


def test_clip_grad_norm_plain_tensors():
    parameters = _parameters_with_grads(torch.tensor([3.0, 0.0]), torch.tensor([[4.0]]))
    norm = clip_grad_norm(parameters, max_norm=None)
    assert float(norm) == pytest.approx(5.0)
    assert parameters[0].grad.tolist() == [3.0, 0.0]  # compute only
    norm = clip_grad_norm(parameters, max_norm=1.0)
    assert float(norm) == pytest.approx(5.0)  # the norm before clipping is returned
    assert parameters[0].grad.tolist() == pytest.approx([3.0 / (5.0 + 1e-6), 0.0])
    assert parameters[1].grad.item() == pytest.approx(4.0 / (5.0 + 1e-6))
    parameters = _parameters_with_grads(torch.tensor([0.3, 0.4]))
    clip_grad_norm(parameters, max_norm=1.0, foreach=False)
    assert parameters[0].grad.tolist() == pytest.approx([0.3, 0.4])  # below max_norm: untouched


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_clip_grad_norm_non_finite_is_reported_not_clipped(bad):
    parameters = _parameters_with_grads(torch.tensor([bad, 1.0]), torch.tensor([2.0]))
    norm = clip_grad_norm(parameters, max_norm=1.0)
    assert not math.isfinite(float(norm))
    assert parameters[1].grad.item() == 2.0


def _fsdp_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (as DataLoader workers)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3), nn.LayerNorm(3))
    reference[0].weight._no_weight_decay = True
    sharded = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3), nn.LayerNorm(3))
    sharded.load_state_dict(reference.state_dict())
    sharded[0].weight._no_weight_decay = True
    marked = marked_no_weight_decay_names(sharded)
    sharded[2] = checkpoint_wrapper(sharded[2])
    fully_shard(sharded[0])
    fully_shard(sharded[2])
    fully_shard(sharded)

    inputs = [torch.randn(5, 6, generator=torch.Generator().manual_seed(10 + r)) for r in range(world_size)]
    sharded(inputs[rank]).pow(2).sum().backward()  # FSDP2 averages gradients over ranks
    sum(reference(x).pow(2).sum() for x in inputs).div(world_size).backward()
    reference_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))

    grads_are_dtensors = all(isinstance(p.grad, DTensor) for p in sharded.parameters())
    norm = clip_grad_norm(sharded.parameters(), max_norm=None)
    extra = nn.Parameter(torch.zeros(2))
    extra.grad = torch.tensor([1.0, 2.0])  # a replicated plain tensor among the DTensors
    mixed_norm = clip_grad_norm([*sharded.parameters(), extra], max_norm=None)
    max_norm = float(reference_norm) / 4
    clipped_norm = clip_grad_norm(sharded.parameters(), max_norm=max_norm)
    full_grads = [p.grad.full_tensor() for p in sharded.parameters()]
    coefficient = max_norm / (float(reference_norm) + 1e-6)
    clipped_matches = all(
        torch.allclose(full, ref.grad * coefficient, atol=1e-6)
        for full, ref in zip(full_grads, reference.parameters())
    )
    groups = _groups_by_decay(parameter_groups(sharded, 0.1, no_decay_names=marked))
    if rank == 0:
        torch.save(
            {
                "norm": float(norm),
                "mixed_norm": float(mixed_norm),
                "clipped_norm": float(clipped_norm),
                "reference_norm": float(reference_norm),
                "grads_are_dtensors": grads_are_dtensors,
                "clipped_matches": clipped_matches,
                "groups": groups,
            },
            result_file,
        )
    dist.destroy_process_group()


def test_clip_grad_norm_fsdp2_two_ranks_matches_unsharded(tmp_path):
    result_file = tmp_path / "result.pt"
    # fork, not spawn: children inherit the imported modules (1 s instead of ~10 s of imports).
    mp.start_processes(
        _fsdp_worker, args=(2, str(tmp_path / "init"), str(result_file)), nprocs=2, start_method="fork"
    )
    result = torch.load(result_file)
    assert result["grads_are_dtensors"]
    assert result["norm"] == pytest.approx(result["reference_norm"], rel=1e-5)
    assert result["mixed_norm"] == pytest.approx(math.sqrt(result["reference_norm"] ** 2 + 5.0), rel=1e-5)
    assert result["clipped_norm"] == pytest.approx(result["reference_norm"], rel=1e-5)
    assert result["clipped_matches"]
    assert result["groups"][0.1] == {"2.weight"}
    assert result["groups"][0.0] == {"0.weight", "0.bias", "2.bias", "3.weight", "3.bias"}
