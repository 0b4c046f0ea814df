"""AdamW parameter groups, applying the learning rate (kotomamba.lr_schedule) and global gradient-norm
clipping.

The training loop drives these pieces in this order for every iteration, where ``iteration`` is the
number of optimizer steps already taken (0 for the first step, Megatron's ``iteration`` before its
increment)::

    lr = schedule.lr_at(iteration)
    apply_lr(optimizer, lr)           # BEFORE optimizer.step(): the lr logged is the lr applied
    grad_norm = clip_grad_norm(model.parameters(), max_norm)
    optimizer.step()

All functions work on plain modules and on FSDP2 (``fully_shard``) modules whose parameters and
gradients are DTensors.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from kotomamba.lr_schedule import OptimizerConfigError

# Parameter names (last dotted component) that never get weight decay: mamba-ssm's SSM parameters.
SSM_NO_DECAY_NAMES = frozenset({"A_log", "D", "dt_bias"})

# Wrapper prefixes that activation checkpointing, FSDP1 and torch.compile insert into parameter names.
_WRAPPER_NAME_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")



def normalize_parameter_name(name: str) -> str:
    """The parameter name without wrapper prefixes, e.g. ``layers.0._checkpoint_wrapped_module.mixer.D``
    becomes ``layers.0.mixer.D``, so names match those of the unwrapped model and its checkpoints."""
    for part in _WRAPPER_NAME_PARTS:
        name = name.replace(part, "")
    return name


def marked_no_weight_decay_names(model: nn.Module) -> set[str]:
    """Normalized names of parameters carrying mamba-ssm's ``_no_weight_decay = True`` marker.

    FSDP2's ``fully_shard`` replaces every parameter with a new DTensor parameter and drops such
    attributes, so call this BEFORE sharding and pass the result to ``parameter_groups`` afterwards.
    """
    return {
        normalize_parameter_name(name)
        for name, parameter in model.named_parameters()
        if getattr(parameter, "_no_weight_decay", False)
    }


def no_weight_decay_parameter_names(model: nn.Module, no_decay_names: set[str] | None = None) -> set[str]:
    """Normalized names of the trainable parameters that get no weight decay; the rule is described
    at ``parameter_groups``, ``no_decay_names`` as there."""
    extra_names = set(no_decay_names or ())
    names = set()
    for raw_name, parameter in model.named_parameters():
        name = normalize_parameter_name(raw_name)
        last_part = name.rsplit(".", 1)[-1]
        if parameter.requires_grad and (
            parameter.ndim <= 1  # norm weights, biases, D, dt_bias (global shape, also for DTensors)
            or last_part.endswith("bias")  # also Mamba-3's multi-dimensional B_bias / C_bias
            or last_part in SSM_NO_DECAY_NAMES  # Mamba-1's A_log is 2-D
            or getattr(parameter, "_no_weight_decay", False)
            or name in extra_names
            or last_part in extra_names
        ):
            names.add(name)
    return names


def parameter_groups(
    model: nn.Module, weight_decay: float, no_decay_names: set[str] | None = None
) -> list[dict]:
    """AdamW parameter groups: with ``weight_decay`` and with 0.0 (empty groups are left out), each
    split once more into FSDP-sharded (DTensor) and plain parameters when the model has both.

    No decay for 1-D parameters (norm weights, biases), any parameter whose name ends in ``bias``,
    mamba-ssm's ``A_log``/``D``/``dt_bias``, parameters marked ``_no_weight_decay = True`` and the
    names in ``no_decay_names`` (normalized full names or last name components, see
    ``marked_no_weight_decay_names``). Embeddings keep weight decay, as in Megatron. A tied lm_head
    weight is listed once (``named_parameters`` deduplicates shared parameters). Frozen parameters
    are left out. Each group carries ``param_names`` (normalized) for logging and tests.
    """
    no_decay = no_weight_decay_parameter_names(model, no_decay_names)
    # (decays, sharded) -> (params, names). FSDP-sharded DTensors and plain tensors (parameters kept
    # out of FSDP) go in separate groups: the fused/foreach AdamW kernels cannot mix them in one call.
    buckets: dict[tuple[bool, bool], tuple[list, list]] = {}
    for raw_name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        name = normalize_parameter_name(raw_name)
        key = (name not in no_decay, isinstance(parameter, DTensor))
        params, names = buckets.setdefault(key, ([], []))
        params.append(parameter)
        names.append(name)
    groups = []
    for decays in (True, False):
        for sharded in (True, False):
            if (decays, sharded) in buckets:
                params, names = buckets[(decays, sharded)]
                groups.append({"params": params, "param_names": names,
                               "weight_decay": weight_decay if decays else 0.0})
    if not groups:
        raise OptimizerConfigError(f"{type(model).__name__} has no trainable parameters to optimize")
    return groups


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    fused: bool | None = None,
    no_decay_names: set[str] | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``parameter_groups(model, ...)``.

    ``fused=None`` picks the fused CUDA kernel when every parameter lives on a CUDA device (it
    supports DTensor parameters) and otherwise leaves torch's default (foreach on accelerators,
    a per-parameter loop on CPU).
    """
    if lr < 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or eps <= 0 or weight_decay < 0:
        raise OptimizerConfigError(
            f"invalid AdamW setting: --lr {lr}, --adam-beta1 {betas[0]}, --adam-beta2 {betas[1]}, "
            f"--adam-eps {eps}, --weight-decay {weight_decay} (need lr >= 0, 0 <= beta < 1, "
            "eps > 0, weight decay >= 0)"
        )
    groups = parameter_groups(model, weight_decay, no_decay_names)
    if fused is None:
        fused = all(p.device.type == "cuda" for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group; call it before ``optimizer.step()``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def scale_gradients_(grads: Iterable[torch.Tensor], factor: float | torch.Tensor, foreach: bool | None = None) -> None:
    """Multiply gradients in place by ``factor`` (a number, or a 0-dim tensor on their device), each rank
    its local shard: one fused multiply per device and dtype (``foreach=False``: one per tensor). A tensor
    factor goes to each group's device (offloaded gradients live on the CPU) and, for fp32 and fp64
    gradients, is rounded to their dtype, as a Python number would be (half-precision gradients are
    multiplied by the fp32 factor)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for grad in grads:
        local = _local(grad)
        groups.setdefault((local.device, local.dtype), []).append(local)
    for (device, dtype), group in groups.items():
        group_factor = factor
        if isinstance(factor, torch.Tensor):
            group_factor = factor.to(device=device, dtype=torch.promote_types(dtype, torch.float32))
        if foreach is False:
            for grad in group:
                grad.mul_(group_factor)
        else:
            torch._foreach_mul_(group, group_factor)


def clip_grad_norm(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float | None,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Global L2 norm of all gradients, then scale them by ``max_norm / (norm + 1e-6)`` if below 1.

    Gradients may be FSDP2 DTensor shards (their norm is reduced across the mesh, so every rank
    gets the true global norm), plain tensors (assumed replicated, counted once) or a mix of both.
    A non-finite norm is returned as is and nothing is clipped: the loop skips that step.
    ``max_norm`` None or 0 only computes the norm. Returns a 0-dim fp32 plain tensor on the
    gradients' device. Nothing is read back to the host: the coefficient is computed on the device (in
    float64, as a Python float would be, then rounded to fp32 as the multiply rounds a Python scalar),
    and applied always (1 when not clipping, which leaves the gradients exactly as they were).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    # Each rank sums the squares of its local pieces, one fused norm per (mesh, sharded mesh dimensions),
    # then adds the other ranks' sums over the dimensions that shard them (replicated ones hold copies):
    # two kernels and one all-reduce instead of a DTensor norm op, and its kernel, per gradient.
    pieces: dict[tuple[object, tuple[int, ...]], list[torch.Tensor]] = {}
    for grad in grads:
        key: tuple[object, tuple[int, ...]] = (None, ())
        if isinstance(grad, DTensor):
            if any(placement.is_partial() for placement in grad.placements):
                raise ValueError(f"clip_grad_norm: a gradient with a partial placement {grad.placements}")
            key = (grad.device_mesh, tuple(i for i, p in enumerate(grad.placements) if p.is_shard()))
        pieces.setdefault(key, []).append(_local(grad))
    device = _local(grads[0]).device
    squared_sum = torch.zeros((), dtype=torch.float64, device=device)
    for (mesh, shard_dims), tensors in pieces.items():
        squared = torch.nn.utils.get_total_norm(tensors, norm_type=2.0, foreach=foreach).double() ** 2
        if shard_dims and squared.device.type != mesh.device_type:  # offloaded gradients: NCCL takes GPU tensors
            squared = squared.to(mesh.device_type)
        for dim in shard_dims:
            dist.all_reduce(squared, group=mesh.get_group(dim))
        squared_sum += squared.to(device)
    total_norm = squared_sum.sqrt().float()
    if max_norm:
        coefficient = (max_norm / (total_norm.double() + 1e-6)).clamp(max=1.0)
        coefficient = torch.where(torch.isfinite(total_norm), coefficient, 1.0).float()
        scale_gradients_(grads, coefficient, foreach)
    return total_norm
