"""Norms of weights, gradients and AdamW moments, reduced over FSDP shards to the figures an unsharded
model would give; logged every --optimizer-stats-interval iterations.

Metric names are ``optimizer/<group>/<quantity>/<statistic>``:

* quantity: ``weight``; ``grad`` (the gradient the optimizer step used: unscaled and clipped; the norm
  before clipping is ``train/grad_norm``); ``exp_avg`` and ``exp_avg_sq`` (Adam's first and second
  moments after the step); ``exp_avg_sq_sqrt`` (the square root of the second moment, Adam's
  denominator without eps);
* statistic: ``l1`` (sum of absolute values), ``l2`` (Euclidean norm), ``abs_max`` (largest absolute
  value);
* group: ``all``; ``embedding``, ``layers.<i>`` (one per mamba-ssm Block), ``norm_f``, ``lm_head``
  (untied only); and one per parameter kind across all blocks, ``layers.*.<name>`` such as
  ``layers.*.mixer.A_log``.

Sharding: each FSDP2 parameter (and its gradient and moments) is a DTensor whose ``to_local()`` shard
excludes FSDP's padding. Sums of shards add up to the whole; a shard replicated over a mesh dimension
(NO_SHARD, HYBRID_SHARD) is counted only by the ranks at coordinate 0 of that dimension, and the
fp32 parameters FSDP ignores (plain tensors, identical on every rank) only by rank 0. Maxima need
no such care. One all-reduce of sums and one of maxima per call.
"""
from __future__ import annotations

import math
import re
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from kotomamba.optim import normalize_parameter_name

QUANTITIES = ("weight", "grad", "exp_avg", "exp_avg_sq", "exp_avg_sq_sqrt")
STATISTICS = ("l1", "l2", "abs_max")

_BLOCK = re.compile(r"^(?:backbone\.)?layers\.(\d+)\.(.+)$")


def stat_groups(name: str) -> tuple[str, ...]:
    """The groups a parameter (normalized name, e.g. ``backbone.layers.3.mixer.in_proj.weight``) counts in."""
    block = _BLOCK.match(name)
    if block:
        return ("all", f"layers.{block.group(1)}", f"layers.*.{block.group(2)}")
    if name.startswith("backbone.embedding."):
        return ("all", "embedding")
    if name.startswith("backbone.norm_f."):
        return ("all", "norm_f")
    return ("all", name.removeprefix("backbone.").split(".")[0])


def _counted_here(tensor: torch.Tensor) -> bool:
    """Whether this rank's piece of `tensor` is counted in sums, so each element counts exactly once."""
    if not isinstance(tensor, DTensor):
        return not dist.is_initialized() or dist.get_rank() == 0
    coordinate = tensor.device_mesh.get_coordinate()
    if coordinate is None:
        return False
    return all(coordinate[dim] == 0 for dim, placement in enumerate(tensor.placements) if placement.is_replicate())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class OptimizerStats:
    """Per-group L1, L2 and abs-max of weights, gradients and AdamW moments of `model` (sharded or not)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.optimizer = optimizer
        self.device = device
        self.parameters: list[tuple[torch.Tensor, list[int], bool]] = []  # parameter, group indices, counted
        index: dict[str, int] = {}
        for raw_name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            group_ids = [index.setdefault(group, len(index)) for group in stat_groups(normalize_parameter_name(raw_name))]
            self.parameters.append((parameter, group_ids, _counted_here(parameter)))
        self.groups: list[str] = list(index)

    def _tensors(self, quantity: str) -> list[tuple[torch.Tensor, list[int], bool]]:
        """(local piece, group indices, counted) of every non-empty tensor of `quantity`."""
        found = []
        for parameter, group_ids, counted in self.parameters:
            if quantity == "weight":
                tensor = parameter
            elif quantity == "grad":
                tensor = parameter.grad
            else:  # exp_avg, exp_avg_sq (exp_avg_sq_sqrt is derived from exp_avg_sq)
                tensor = self.optimizer.state.get(parameter, {}).get(quantity.removesuffix("_sqrt"))
            if tensor is None:
                continue
            local = _local(tensor).detach()
            if local.numel():
                found.append((local, group_ids, counted))
        return found

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        """``optimizer/<group>/<quantity>/<statistic>`` for every group; a collective (call on every rank)."""
        n_groups, n_quantities = len(self.groups), len(QUANTITIES)
        sums = torch.zeros(n_groups, n_quantities, 2, dtype=torch.float64, device=self.device)  # l1, l2²
        maxima = torch.zeros(n_groups, n_quantities, dtype=torch.float64, device=self.device)
        for q, quantity in enumerate(QUANTITIES):
            found = self._tensors(quantity)
            if not found:
                continue
            tensors = [t for t, _, _ in found]
            if quantity == "exp_avg_sq_sqrt":
                # sqrt(v) is never materialized: sum sqrt(v) is the 0.5-"norm" raised to 0.5, the sum of
                # its squares is sum v, and its maximum is sqrt(max v) (v >= 0).
                l1 = torch.stack(torch._foreach_norm(tensors, 0.5)).double().sqrt()
                squares = torch.stack(torch._foreach_norm(tensors, 1)).double()
                maximum = torch.stack(torch._foreach_norm(tensors, math.inf)).double().sqrt()
            else:
                l1 = torch.stack(torch._foreach_norm(tensors, 1)).double()
                squares = torch.stack(torch._foreach_norm(tensors, 2)).double() ** 2
                maximum = torch.stack(torch._foreach_norm(tensors, math.inf)).double()
            per_tensor = torch.stack([l1, squares, maximum], dim=1).to(self.device)
            rows, groups, counted = [], [], []
            for row, (_, group_ids, is_counted) in enumerate(found):
                for group in group_ids:
                    rows.append(row)
                    groups.append(group)
                    counted.append(float(is_counted))
            rows_t = torch.tensor(rows, device=self.device)
            groups_t = torch.tensor(groups, device=self.device)
            weights = torch.tensor(counted, dtype=torch.float64, device=self.device)
            sums[:, q].index_add_(0, groups_t, per_tensor[rows_t, :2] * weights[:, None])
            maxima[:, q].scatter_reduce_(0, groups_t, per_tensor[rows_t, 2], reduce="amax")
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        sums, maxima = sums.tolist(), maxima.tolist()
        values = {}
        for g, group in enumerate(self.groups):
            for q, quantity in enumerate(QUANTITIES):
                prefix = f"optimizer/{group}/{quantity}"
                values[f"{prefix}/l1"] = sums[g][q][0]
                values[f"{prefix}/l2"] = math.sqrt(sums[g][q][1])
                values[f"{prefix}/abs_max"] = maxima[g][q]
        return values


def summary_line(iteration: int, values: dict[str, float]) -> str:
    """One readable line of the whole-model figures for the log (the groups go to the metric sinks)."""
    parts = [f"optimizer stats at iteration {iteration}"]
    for quantity in QUANTITIES:
        prefix = f"optimizer/all/{quantity}"
        parts.append(f"{quantity} l2 {values[f'{prefix}/l2']:.4g} max {values[f'{prefix}/abs_max']:.4g}")
    return " | ".join(parts)
