"""Precision presets (bf16 / fp16 / fp32), their FSDP2 mixed-precision policy and loss scaling.

Presets (``--precision``), all keeping fp32 master weights (FSDP2 keeps the sharded parameters in
the dtype the model was built in, fp32, and the optimizer updates those):

* ``bf16``: FSDP2 all-gathers bf16 copies of the parameters, so forward and backward run in bf16;
  gradients are reduce-scattered in fp32. No loss scaling (bf16 has fp32's exponent range).
* ``fp16`` (V100, no bf16): kotomamba's V100 recipe. Parameters stay fp32 in FSDP2 and compute runs
  under ``torch.autocast(dtype=float16)``; gradients are reduce-scattered in fp16 (half the
  traffic on V100's slower links); dynamic loss scaling keeps small gradients representable, and
  an fp16 overflow in the reduction shows up as inf, so the step is skipped and the scale backs off.
* ``fp32``: everything fp32.
* ``auto``: ``bf16`` on GPUs that support it, ``fp16`` on older GPUs (V100), ``fp32`` on CPU
  (CPU runs are for tests and demos, where exact fp32 results matter more than speed).

``--param-dtype`` / ``--reduce-dtype`` override the preset's FSDP2 dtypes. Compute runs in the
preset's ``compute_dtype``; when the parameters are not already in that dtype the loop wraps forward
in ``autocast_context(policy, device_type)``.

mamba-ssm parameters that should stay fp32: ``A_log``, ``D`` and ``dt_bias`` (Mamba-1: ``dt_proj.bias``).
mamba-ssm builds Mamba-1's ``A_log``/``D`` in fp32 whatever the model dtype, and its kernels upcast
all of them before use: ``A = -torch.exp(self.A_log.float())`` and ``self.D.float()`` in
``mamba_simple.py``/``mamba2.py``, ``delta_bias.float()`` in ``selective_scan_interface.py``, and the
Triton SSD kernels load A, dt_bias and D with ``.to(tl.float32)`` (``ssd_chunk_state.py``,
``ssd_chunk_scan.py``). So fp32 values cost nothing extra. FSDP2 casts every parameter of one ``fully_shard`` unit to that
unit's ``param_dtype``, which under ``bf16`` would feed the kernels bf16-rounded copies (``A_log`` to
about 0.4% relative error); ``kotomamba.parallel.parallelize`` therefore keeps these parameters out
of FSDP (replicated, fp32, gradients averaged by ``ShardedModel.sync_replicated_gradients``) whenever
the parameter dtype is not fp32. ``FP32_PARAMETER_NAMES`` lists the names.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from kotomamba.optim import scale_gradients_
from kotomamba.errors import KotomambaError

FP32_PARAMETER_NAMES = ("A_log", "D", "dt_bias")

_DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
# preset -> (param_dtype, reduce_dtype, compute_dtype)
_PRESETS = {
    "bf16": (torch.bfloat16, torch.float32, torch.bfloat16),
    "fp16": (torch.float32, torch.float16, torch.float16),
    "fp32": (torch.float32, torch.float32, torch.float32),
}


class PrecisionConfigError(KotomambaError, ValueError):
    """A precision flag is invalid or unsupported on this device; the message names the flag."""


@dataclass(frozen=True)
class PrecisionPolicy:
    """Resolved precision settings.

    ``param_dtype``: dtype FSDP2 all-gathers parameters in (what forward/backward see).
    ``reduce_dtype``: dtype of the gradient reduce-scatter / all-reduce.
    ``compute_dtype``: dtype of matmuls; autocast is used when it differs from ``param_dtype``.
    ``use_loss_scaling``: fp16 is involved, so the loop needs a ``DynamicLossScaler``.
    """

    name: str
    param_dtype: torch.dtype
    reduce_dtype: torch.dtype
    compute_dtype: torch.dtype
    use_loss_scaling: bool

    @property
    def uses_autocast(self) -> bool:
        return self.compute_dtype != self.param_dtype


def _parse_dtype(value: str | torch.dtype, flag: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        dtype = _DTYPE_NAMES.get(value.lower())
        if dtype is None:
            raise PrecisionConfigError(
                f"{flag} {value!r} is not one of fp32, bf16, fp16 (or float32, bfloat16, float16)"
            )
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise PrecisionConfigError(f"{flag} {dtype} is not one of float32, bfloat16, float16")
    return dtype


def resolve_precision(
    preset: str,
    param_dtype: str | torch.dtype | None = None,
    reduce_dtype: str | torch.dtype | None = None,
    device_type: str = "cpu",
) -> PrecisionPolicy:
    """The ``PrecisionPolicy`` for ``--precision preset`` with optional dtype overrides.

    ``auto`` is ``bf16`` on CUDA GPUs that support it (Ampere and newer), ``fp16`` on older CUDA
    GPUs (V100) and ``fp32`` on CPU.

    Raises ``PrecisionConfigError`` for unknown names, for a ``--param-dtype`` that is neither fp32
    nor the compute dtype (autocast cannot turn fp16 parameters into bf16 compute cleanly), and for
    bf16 on a CUDA device without bf16 support (V100: use ``--precision fp16``).
    """
    if preset == "auto":
        if device_type != "cuda":
            preset = "fp32"
        else:
            preset = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if preset not in _PRESETS:
        raise PrecisionConfigError(
            f"--precision {preset!r} is not one of auto, {', '.join(_PRESETS)}"
        )
    preset_param, preset_reduce, compute_dtype = _PRESETS[preset]
    resolved_param = preset_param if param_dtype is None else _parse_dtype(param_dtype, "--param-dtype")
    resolved_reduce = (
        preset_reduce if reduce_dtype is None else _parse_dtype(reduce_dtype, "--reduce-dtype")
    )
    if resolved_param not in (torch.float32, compute_dtype):
        raise PrecisionConfigError(
            f"--param-dtype {resolved_param} does not fit --precision {preset} (compute in "
            f"{compute_dtype}): use float32 or {compute_dtype}"
        )
    uses_bf16 = torch.bfloat16 in (resolved_param, resolved_reduce, compute_dtype)
    if uses_bf16 and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionConfigError(
            f"--precision {preset} needs bfloat16, which {torch.cuda.get_device_name()} does not "
            "support: use --precision fp16"
        )
    uses_fp16 = torch.float16 in (resolved_param, resolved_reduce, compute_dtype)
    return PrecisionPolicy(
        name=preset,
        param_dtype=resolved_param,
        reduce_dtype=resolved_reduce,
        compute_dtype=compute_dtype,
        use_loss_scaling=uses_fp16,
    )


def autocast_context(policy: PrecisionPolicy, device_type: str):
    """``torch.autocast`` to ``policy.compute_dtype`` when parameters are in another dtype, else a no-op."""
    if not policy.uses_autocast:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=policy.compute_dtype)


class DynamicLossScaler:
    """Megatron's ``DynamicGradScaler`` for fp16 training, its state kept on the training device.

    Multiply the loss by ``scale`` before backward; ``unscale_`` divides the gradients by ``scale``.
    Whether a gradient overflowed the loop learns from the global gradient norm, which it computes
    anyway: one inf/nan on any rank makes it non-finite on every rank; the step is then skipped.
    ``update(overflow)``: every overflow resets the growth counter and
    uses up one unit of ``hysteresis``; once hysteresis is used up each further overflow multiplies
    the scale by ``backoff_factor`` (not below ``min_scale``). After ``growth_interval`` clean steps
    in a row the scale grows by ``growth_factor`` and hysteresis is refilled.

    The scale and both counters are 0-dim tensors on ``device`` and ``update`` takes the overflow flag as
    a tensor, so that a step never waits for the host to learn whether it overflowed. The scale is held in
    float64, as a Python float would be: the values and their rounding are those of the host algorithm.
    ``scale`` (a property) reads it back: for logs, tests and checkpoints, not inside a step.
    """

    def __init__(
        self,
        initial_scale: float = 2.0**16,
        min_scale: float = 1.0,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
        device: torch.device | str = "cpu",
    ) -> None:
        if not 0.0 < min_scale <= initial_scale:
            raise PrecisionConfigError(
                f"need 0 < --min-loss-scale ({min_scale}) <= --initial-loss-scale ({initial_scale})"
            )
        if growth_factor <= 1.0 or not 0.0 < backoff_factor < 1.0:
            raise PrecisionConfigError(
                f"need loss-scale growth factor > 1 ({growth_factor}) and 0 < backoff factor < 1 "
                f"({backoff_factor})"
            )
        if growth_interval <= 0 or hysteresis <= 0:
            raise PrecisionConfigError(
                f"need --loss-scale-window ({growth_interval}) > 0 and --hysteresis ({hysteresis}) > 0"
            )
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.device = torch.device(device)
        self.scale_tensor = torch.tensor(float(initial_scale), dtype=torch.float64, device=self.device)
        self._growth_tracker = torch.zeros((), dtype=torch.int64, device=self.device)
        self._hysteresis_tracker = torch.full((), hysteresis, dtype=torch.int64, device=self.device)

    @property
    def scale(self) -> float:
        return float(self.scale_tensor)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        # The scale rounded to the loss's dtype, as multiplying by a Python float rounds it.
        return loss * self.scale_tensor.to(loss.dtype)

    def unscale_(self, parameters: Iterable[torch.Tensor]) -> None:
        """Divide the gradients by ``scale`` in place."""
        scale_gradients_([p.grad for p in parameters if p.grad is not None], 1.0 / self.scale_tensor)

    def is_calibrating(self, loss_scale: float) -> bool:
        """Whether an overflow at `loss_scale` is this scaler finding its level (the scale can still come
        down) rather than a failing run: such skips do not count toward --max-consecutive-skips. Starting
        at 2**32, the first ~15 steps of an fp16 run overflow this way."""
        return loss_scale > self.min_scale

    def update(self, overflow: bool | torch.Tensor) -> None:
        """One step's outcome, on the device (a handful of scalar kernels, no host read)."""
        overflow = torch.as_tensor(overflow, device=self.device).bool()
        growth = torch.where(overflow, 0, self._growth_tracker + 1)
        hysteresis = torch.where(overflow, self._hysteresis_tracker - 1, self._hysteresis_tracker)
        backs_off = overflow & (hysteresis <= 0)
        grows = growth == self.growth_interval
        scale = torch.where(backs_off, (self.scale_tensor * self.backoff_factor).clamp(min=self.min_scale),
                            self.scale_tensor)
        self.scale_tensor.copy_(torch.where(grows, scale * self.growth_factor, scale))
        self._growth_tracker.copy_(torch.where(grows, 0, growth))
        self._hysteresis_tracker.copy_(torch.where(grows, self.hysteresis, hysteresis))

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "growth_tracker": int(self._growth_tracker),
            "hysteresis_tracker": int(self._hysteresis_tracker),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        scale = state_dict["scale"]
        # Megatron checkpoints store the scale as a 1-element tensor.
        self.scale_tensor.fill_(float(scale.item() if isinstance(scale, torch.Tensor) else scale))
        self._growth_tracker.fill_(int(state_dict["growth_tracker"]))
        self._hysteresis_tracker.fill_(int(state_dict["hysteresis_tracker"]))


class NoLossScaler:
    """Same surface as ``DynamicLossScaler`` for bf16/fp32: scale 1, gradients untouched. (Non-finite
    gradients still skip the step: the loop checks the global gradient norm.)"""

    scale = 1.0

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.scale_tensor = torch.ones((), dtype=torch.float64, device=device)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, parameters: Iterable[torch.Tensor]) -> None:
        """Nothing to undo."""

    def is_calibrating(self, loss_scale: float) -> bool:
        return False

    def update(self, overflow: bool | torch.Tensor) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore."""


def build_loss_scaler(policy: PrecisionPolicy, device: torch.device | str,
                      **dynamic_options) -> DynamicLossScaler | NoLossScaler:
    """``DynamicLossScaler(**dynamic_options)`` on ``device``, the training device, when ``policy`` needs
    loss scaling, else ``NoLossScaler`` (a scale kept elsewhere would cost every step a copy of its
    overflow flag)."""
    if policy.use_loss_scaling:
        return DynamicLossScaler(**dynamic_options, device=device)
    return NoLossScaler(device)
