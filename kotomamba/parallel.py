"""Activation checkpointing and FSDP (`fully_shard`) for mamba-ssm's MambaLMHeadModel, in that order.

One FSDP unit per mamba-ssm `Block`; the embedding, the final norm and the tied `lm_head` share the
root unit. The sharding strategies users know from FSDP1 map onto FSDP2 as follows:

| --sharding-strategy | device mesh                  | reshard_after_forward |
|---------------------|------------------------------|-----------------------|
| FULL_SHARD          | 1-D (world)                  | True                  |
| SHARD_GRAD_OP       | 1-D (world)                  | False                 |
| HYBRID_SHARD        | 2-D (nodes, GPUs per node)   | True                  |
| _HYBRID_SHARD_ZERO2 | 2-D (nodes, GPUs per node)   | False                 |
| NO_SHARD            | 2-D (world, 1): replicate    | True (nothing to free)|

mamba-ssm's fp32-sensitive parameters (`A_log`, `D`, `dt_bias`/`dt_proj.bias`) are kept out of
FSDP's low-precision cast when the compute dtype is not fp32: FSDP2 casts every parameter of a unit to
one dtype, and rounding `A_log` to bf16 perturbs A = -exp(A_log) by up to ~0.5%. They are few (about
0.2% of a 2.8B model), so they stay replicated in fp32 and their gradients are averaged by
`sync_replicated_gradients` (see `ShardedModel`).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from kotomamba.arguments import SHARDING_STRATEGIES
from kotomamba.distributed import DistributedContext
from kotomamba.launcher import LaunchError
from kotomamba.precision import FP32_PARAMETER_NAMES

logger = logging.getLogger(__name__)

# Strategies that keep the all-gathered parameters from forward to backward (ZeRO-2 style).
KEEP_PARAMETERS_AFTER_FORWARD = ("SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2")
# Mamba-1 keeps its dt bias in dt_proj; the kernels read it in fp32 like the FP32_PARAMETER_NAMES.
FP32_SENSITIVE_SUFFIXES = ("dt_proj.bias",)


@dataclass
class ShardedModel:
    """The sharded model plus what the training loop needs to drive it correctly."""

    module: nn.Module
    mesh: DeviceMesh
    data_parallel_size: int
    replicated_parameters: list[nn.Parameter] = field(default_factory=list)

    def set_gradient_sync(self, enabled: bool) -> None:
        """Skip gradient reduction on non-final micro-steps of gradient accumulation."""
        self.module.set_requires_gradient_sync(enabled)

    def sync_replicated_gradients(self) -> None:
        """Average the gradients of the fp32 parameters FSDP does not manage, like FSDP averages its own."""
        grads = [p.grad for p in self.replicated_parameters if p.grad is not None]
        if not grads or dist.get_world_size() == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        pieces = flat.split([g.numel() for g in grads])
        torch._foreach_copy_(grads, [piece.view_as(g) for piece, g in zip(pieces, grads)])


def mesh_layout(strategy: str, world_size: int, processes_per_node: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The device-mesh shape and dimension names of a --sharding-strategy; parameters are split over the
    last dimension ("shard"), replicated over the first of a 2-D mesh ("replicate")."""
    if strategy not in SHARDING_STRATEGIES:
        raise ValueError(f"--sharding-strategy {strategy!r} is not one of {', '.join(SHARDING_STRATEGIES)}")
    if strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
        return (world_size,), ("shard",)
    if strategy == "NO_SHARD":
        return (world_size, 1), ("replicate", "shard")
    if world_size % processes_per_node:
        raise LaunchError(
            f"--sharding-strategy {strategy} needs the same number of processes on every node: "
            f"world size {world_size} is not a multiple of {processes_per_node} per node"
        )
    return (world_size // processes_per_node, processes_per_node), ("replicate", "shard")


def build_mesh(ctx: DistributedContext, strategy: str) -> DeviceMesh:
    shape, names = mesh_layout(strategy, ctx.world_size, ctx.local_world_size)
    return init_device_mesh(ctx.device.type, shape, mesh_dim_names=names)


def is_fp32_sensitive(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in FP32_PARAMETER_NAMES or name.endswith(FP32_SENSITIVE_SUFFIXES)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """mamba-ssm's residual blocks (`model.backbone.layers`), whatever mixer they hold."""
    try:
        return list(model.backbone.layers)
    except AttributeError:
        raise TypeError(f"{type(model).__name__} is not a mamba-ssm MambaLMHeadModel (no backbone.layers)") from None


def apply_activation_checkpointing(model: nn.Module, blocks: int | None = None) -> None:
    """Recompute the activations of the first `blocks` Blocks (default all) in backward. The composable
    API keeps parameter names unchanged."""
    from torch.distributed._composable import checkpoint

    for block in transformer_blocks(model)[:blocks]:
        checkpoint(block)


def parallelize(
    model: nn.Module,
    ctx: DistributedContext,
    strategy: str = "FULL_SHARD",
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    checkpointed_blocks: int = 0,
    cpu_offload: bool = False,
    blocks_per_unit: int = 1,
) -> ShardedModel:
    """Apply activation checkpointing (to the first `checkpointed_blocks` Blocks), then FSDP: one unit
    per `blocks_per_unit` consecutive Blocks, the rest in the root."""
    mesh = build_mesh(ctx, strategy)
    if checkpointed_blocks:
        apply_activation_checkpointing(model, checkpointed_blocks)

    replicated: list[nn.Parameter] = []
    if param_dtype != torch.float32:
        replicated = [p for name, p in model.named_parameters() if is_fp32_sensitive(name)]
    ignored = set(replicated)

    mp_policy = MixedPrecisionPolicy(
        param_dtype=None if param_dtype == torch.float32 else param_dtype,
        reduce_dtype=reduce_dtype,
    )
    common = dict(
        mesh=mesh,
        mp_policy=mp_policy,
        # Pinned host memory needs an accelerator; on a CPU-only run offloading is a no-op anyway.
        offload_policy=CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if cpu_offload else None,
    )
    if common["offload_policy"] is None:
        del common["offload_policy"]
    reshard = strategy not in KEEP_PARAMETERS_AFTER_FORWARD
    blocks = transformer_blocks(model)
    # The first Block returns its input as the residual (mamba-ssm's add-norm has nothing to add yet), and
    # FSDP hands each unit its inputs as views; FSDP then warns that an in-place op on that view would skip
    # an all-gather. No one modifies the residual in place (the next Block adds to it out of place);
    # the 1-vs-2-process and unsharded-reference equality tests would fail otherwise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor",
                            category=UserWarning)
    units = [blocks[start:start + blocks_per_unit] for start in range(0, len(blocks), blocks_per_unit)]
    for i, unit in enumerate(units):
        unit_ignored = {p for block in unit for p in block.parameters() if p in ignored}
        # The last unit's parameters are needed again at once by backward: keeping them saves an all-gather.
        fully_shard(
            unit[0] if len(unit) == 1 else unit,
            reshard_after_forward=reshard and i < len(units) - 1,
            ignored_params=unit_ignored or None,
            **common,
        )
    fully_shard(model, reshard_after_forward=reshard, ignored_params=ignored or None, **common)

    dp = ctx.world_size
    logger.info(
        "FSDP: strategy=%s mesh=%s units=%d param_dtype=%s reduce_dtype=%s fp32-replicated params=%d "
        "activation checkpointing on %d of %d blocks, cpu_offload=%s",
        strategy, tuple(mesh.shape), len(units) + 1, param_dtype, reduce_dtype,
        sum(p.numel() for p in replicated), checkpointed_blocks, len(blocks), cpu_offload,
    )
    return ShardedModel(model, mesh, dp, replicated)
